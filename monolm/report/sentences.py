"""The report's sentences, computed from the numbers: one finding per comparison (its verdict
words from the sign of the measured difference and its p-value, never from the code), the
training recipe in words, and what the constraint is (non-negative FFN weights, not a monotone
model) with the measured violation rates."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from monolm.report.formatting import fmt_num, fmt_p, fmt_pct
from monolm.report.labels import ARMS, ATTACK_METRICS, ATTACKS, LOWER_IS_BETTER, METRIC_LABEL, MODELS
from monolm.report.summaries import summary_of
from monolm.report.verdicts import MIN_SEEDS, few_seeds_sentence, significant


def _direction_words(stage: str, metric: str, diff: float) -> str:
    if metric in LOWER_IS_BETTER or stage == "evaluate":  # quality (perplexity or per-document loss)
        return (
            "the constrained arm has higher held-out loss than the baseline (the constraint costs quality)"
            if diff > 0
            else "the constrained arm has lower held-out loss than the baseline"
        )
    attack = ATTACKS.get(stage, stage)
    if diff > 0:
        return f"{attack} did more damage to the constrained arm than to the baseline (less robust by this measure)"
    return f"{attack} did less damage to the constrained arm than to the baseline (more robust by this measure)"


def finding(comp: dict[str, Any], *, headline: str) -> str:
    """One finding sentence from a comparison record: verdict words from its numbers, then the test.
    A primary test's verdict is Holm-corrected over the report's primary tests; a secondary
    (or supporting within-seed) test is reported without a verdict (`monolm.report.verdicts`)."""
    if comp["mean_diff"] is None:
        return f"{headline}: no data. {comp['sentence']}."
    role, sentence = comp.get("role"), comp["sentence"]
    if role in ("secondary", "supporting"):
        what = "secondary measure" if role == "secondary" else "a within-seed test supporting the across-seed one"
        lead = f"{what}, not a verdict"
        sentence = sentence.replace(": significant at α=", ": p below α before any correction, α=")
    elif significant(comp):
        lead = _direction_words(comp["stage"], comp["metric"], comp["mean_diff"])
        if role == "primary":
            lead += f" (Holm-adjusted p={fmt_p(comp['p_holm'])} over {comp['holm_m']} primary tests)"
    elif comp["significant"] and role == "primary":
        lead = (
            f"no significant difference after the Holm correction over the {comp['holm_m']} primary tests "
            f"(Holm-adjusted p={fmt_p(comp['p_holm'])})"
        )
        sentence = sentence.replace(": significant at α=", ": significant before the correction only, α=")
    else:
        lead = "no significant difference between the constrained arm and the baseline"
    return f"{headline}: {lead}. {sentence}."


# Quality first, then each attack metric for every attack (absolute before relative before rates).
def finding_order() -> tuple[tuple[str, str], ...]:
    return (
        ("evaluate", "loss"),
        ("evaluate", "token_perplexity"),
        *((attack, metric) for metric in ATTACK_METRICS for attack in ATTACKS),
    )


def _within_seed_count(within: Sequence[dict[str, Any]]) -> str:
    """In how many seeds the within-seed tests found a difference, and in which direction."""
    higher = sum(c["significant"] and (c["mean_diff"] or 0) > 0 for c in within)
    lower = sum(c["significant"] and (c["mean_diff"] or 0) < 0 for c in within)
    return (
        f" Within single seeds (paired t-tests over {within[0]['scope']}, uncorrected), the difference was "
        f"significant in {higher + lower} of {len(within)} seeds"
        + (f" ({higher} with the constrained arm higher, {lower} lower)" if higher + lower else "")
        + "."
    )


def _metric_findings(results: dict[str, Any], stage: str, metric: str) -> list[str]:
    """The findings on one metric: the across-seed test (with a count of the within-seed ones),
    else each within-seed test, else the bare means of a headline metric without any test."""
    comps = results["comparisons"]
    headline = f"{ATTACKS[stage]} {METRIC_LABEL[metric]}" if stage in ATTACKS else METRIC_LABEL[metric].capitalize()
    across = [c for c in comps if c["stage"] == stage and c["metric"] == metric and c["scope"] == "seeds"]
    within = [c for c in comps if c["stage"] == stage and c["metric"] == metric and c["scope"] != "seeds"]
    if stage == "evaluate":  # within a seed, quality (the loss) is compared per document
        within = [c for c in comps if c["stage"] == "evaluate" and c["metric"] == "doc_loss" and metric == "loss"]
    if across:
        return [finding(across[0], headline=headline) + (_within_seed_count(within) if within else "")]
    if within:  # the caveat these tests share is said once, under the headline table
        return [finding(comp, headline=headline) for comp in within]
    means = {r["model"]: r for r in results["summaries"] if r["stage"] == stage and r["metric"] == metric}
    if metric not in ("loss", "abs_increase") or not means:
        return []
    n = max(r["n"] for r in means.values())
    shown = ", ".join(f"{m} {fmt_num(means[m]['mean'])}" for m in MODELS if m in means)
    return [
        f"{headline}: {shown} (n={n} seed{'s' if n != 1 else ''}); no paired test possible "
        "(fewer than 2 seeds and no per-example values), so no difference is claimed."
    ]


def _control_findings(comps: Sequence[dict[str, Any]]) -> list[str]:
    """Did each gradient-guided attack (HotFlip, GCG) beat its query-only random control at the
    same budget? (a gradient masking check; if not, the finding says so)"""
    out = []
    for comp in comps:
        if comp["metric"].startswith("gradient_vs_control_"):
            arm = comp["metric"].removeprefix("gradient_vs_control_")
            if comp["significant"] and comp["mean_diff"] > 0:
                lead = "the gradient-guided search beat the query-only random search"
            elif comp["significant"]:
                lead = "the query-only random search beat the gradient-guided search (a sign of gradient masking)"
            else:
                lead = "the gradient-guided search did not differ significantly from query-only random search"
            name = ATTACKS.get(comp["stage"], comp["stage"])
            out.append(f"{name} vs its random-candidate control on the {arm} arm: {lead}. {comp['sentence']}.")
    return out


def findings(results: dict[str, Any]) -> list[str]:
    """The report's finding sentences, in reading order: quality, then absolute attack effects,
    then relative effects and success rates, then the gradient-vs-control check."""
    n_seeds = len((results.get("meta") or {}).get("seeds") or [])
    out = [few_seeds_sentence(n_seeds)] if 1 < n_seeds < MIN_SEEDS else []
    out += [sentence for stage, metric in finding_order() for sentence in _metric_findings(results, stage, metric)]
    out.extend(_disagreement(results["comparisons"], results["summaries"]))
    out.extend(_control_findings(results["comparisons"]))
    return out


def _disagreement(comps: Sequence[dict[str, Any]], summaries: Sequence[dict[str, Any]]) -> list[str]:
    """Flag attacks where the relative effect says something the absolute one does not: opposite
    directions, or a significant relative difference without a significant absolute one."""
    out = []
    for stage, name in ATTACKS.items():
        primary = [c for c in comps if c["stage"] == stage and c["scope"] == "seeds"] or [
            c for c in comps if c["stage"] == stage and c["scope"] == "texts"
        ]
        by_metric = {c["metric"]: c for c in primary}
        a, r = by_metric.get("abs_increase"), by_metric.get("rel_increase")
        if a and r and r["significant"] and not significant(a):
            clean = {arm: summary_of(summaries, stage, arm, "clean_loss") for arm in ARMS}
            if all(clean.values()):
                higher = max(ARMS, key=lambda arm: clean[arm]["mean"])
                out.append(
                    f"{name}: the relative loss increase differs significantly between the arms but the "
                    "absolute one does not. The relative increase divides by the clean loss, which is higher "
                    f"for the {higher} arm (baseline {fmt_num(clean['baseline']['mean'])}, monotonic "
                    f"{fmt_num(clean['monotonic']['mean'])} nats/token), so the relative difference can come "
                    "from the clean loss alone; the absolute increase is the primary measure."
                )
        if a and r and a["mean_diff"] and r["mean_diff"] and (a["mean_diff"] > 0) != (r["mean_diff"] > 0):
            out.append(
                f"{name}: the absolute and relative loss increases point in opposite directions "
                f"(monotonic − baseline: {fmt_num(a['mean_diff'], sign=True)} nats/token absolute, "
                f"{fmt_num(r['mean_diff'], sign=True)} relative). The relative increase divides by the clean "
                "loss and flatters the model with the higher clean loss; the absolute increase is the "
                "primary measure."
            )
    return out


def recipe_statement(meta: dict[str, Any], values: Sequence[dict[str, Any]]) -> str:
    """The training recipe in words, computed from the resolved per-arm settings and checked
    against what the training stages report (tokens seen per arm)."""
    recipe = meta["recipe"]
    arms = meta.get("arms") or {}
    base, mono = arms.get("baseline", {}), arms.get("monotonic", {})
    differing = sorted(k for k in set(base) | set(mono) if base.get(k) != mono.get(k))
    if recipe == "fair":
        text = (
            "Training recipe: **fair** — both arms were trained with identical data, token budget, optimizer and "
            f"schedule (lr={base.get('lr')}, schedule={base.get('schedule')}, max_steps={base.get('max_steps')}, "
            f"effective batch={base.get('micro_batch_size', 0) * base.get('grad_accum_steps', 0)} sequences)."
        )
    else:
        what = "the original study's asymmetric recipe" if recipe == "reference" else "a per-arm recipe"
        diffs = "; ".join(f"{k}: baseline {base.get(k)} vs monotonic {mono.get(k)}" for k in differing) or "none"
        text = (
            f"Training recipe: **{recipe}** ({what}) — the arms were trained differently ({diffs}). Differences "
            "between the arms may come from the recipe rather than from the constraint."
        )
    text += " " + decay_statement(base)
    tokens: dict[int, dict[str, float]] = defaultdict(dict)
    for r in values:
        if r["metric"] == "tokens_seen" and r["stage"].startswith("train_"):
            tokens[r["seed"]][r["model"]] = r["value"]
    unequal = sorted(s for s, t in tokens.items() if len(t) == 2 and t["baseline"] != t["monotonic"])
    if unequal:
        text += (
            " Tokens seen differ between the arms in seed(s) "
            + ", ".join(
                f"{s} (baseline {tokens[s]['baseline']:.0f}, monotonic {tokens[s]['monotonic']:.0f})" for s in unequal
            )
            + "."
        )
    elif tokens:
        text += " Both arms saw the same number of training tokens in every seed."
    return text


def decay_statement(arm: dict[str, Any]) -> str:
    """The weight-decay policy of the (common) recipe in words: the same rule for both arms, and
    what happens to the constrained weights W = softplus(V)."""
    wd = arm.get("weight_decay")
    if not wd:
        return "Weight decay: none in either arm."
    policy = arm.get("constrained_weight_decay")
    if policy == "materialized":
        constrained = (
            f"the constrained weights W = softplus(V) were decayed as W itself (W ← (1 − lr·{wd})·W after each "
            "step), so both arms' weights are pulled towards 0"
        )
    elif policy == "none":
        constrained = (
            "the constrained weights W = softplus(V) were not decayed (decaying V would pull W towards ln 2, not 0)"
        )
    else:
        constrained = "the constrained arm's V was decayed by AdamW, which pulls W = softplus(V) towards ln 2, not 0"
    return (
        f"Weight decay: AdamW, {wd} on weight matrices and embeddings in both arms, none on biases and LayerNorm "
        f"weights; {constrained}."
    )


def _violation_words(results: dict[str, Any], rec: dict[str, Any]) -> tuple[str, bool]:
    """One sublayer's measured rate in words, and whether any violation was found."""
    base = rec["metric"].removesuffix("_coord_violation_rate")
    name = base.removeprefix("monotonicity_").replace("_", " ")
    pairs = summary_of(results["summaries"], rec["stage"], rec["model"], base + "_n_pairs")
    pair_rate = summary_of(results["summaries"], rec["stage"], rec["model"], base + "_pair_violation_rate")
    violated = rec["mean"] > 0 or bool(pair_rate and pair_rate["mean"] > 0)
    n_pairs = f"{pairs['mean']:.0f} sampled input pairs" if pairs else "the sampled input pairs"
    if not violated:
        return f"{name}: 0% (no violation in {n_pairs})", False
    share = f"violations in {fmt_pct(pair_rate['mean'])} of {n_pairs}: " if pair_rate else ""
    return f"{name}: {fmt_pct(rec['mean'])} ({share}not monotone)", True


def monotonicity_statement(results: dict[str, Any]) -> str:
    """ "Non-negative FFN weights", never "monotone", with the measured violation rates and what
    they show: a sublayer with violations is called non-monotone, one without is reported as
    having none among the sampled pairs (an empirical check, not a proof)."""
    rows = [
        r
        for r in results["summaries"]
        if r["metric"].startswith("monotonicity_") and r["metric"].endswith("_coord_violation_rate")
    ]
    after = [r for r in rows if r["stage"] == "evaluate"] or [r for r in rows if r["stage"] == "constrain"]
    text = "The constrained arm has non-negative FFN weights (W = softplus(V)) and is not described as monotone."
    if not after:
        return text + " No monotonicity violation rates were measured."
    when = "after training" if after[0]["stage"] == "evaluate" else "after constraining (before training)"
    words = [_violation_words(results, r) for r in after]
    text += (
        f" Measured share of output coordinates that decreased when the input increased ({when}, mean over "
        f"{after[0]['n']} seed{'s' if after[0]['n'] != 1 else ''}): " + "; ".join(w for w, _ in words) + "."
    )
    if any(violated for _, violated in words):
        return text
    return text + (
        " No measured sublayer violated monotonicity among the sampled pairs; the rest of the model (attention, "
        "LayerNorm, residual paths) was not measured, so the model is not claimed to be monotone."
    )
