"""Stage 7's numbers and words: per-seed values, across-seed summaries, paired tests between the
arms, and the tables (Markdown, LaTeX/booktabs, CSV) and report built from them.

Why every finding is computed here and nowhere else: the original study's summary named the
constrained model "most robust" by a constant. Here a sentence that states a finding is assembled
from a `monolm.stats.paired_test` result: it names the test and n and says "not significant" when
the test says so. The verdict words ("higher", "lower", "more damage") come from the sign of the
measured difference and its p-value, never from the code.

Conventions:
* Differences are always monotonic − baseline (the constrained arm minus the unconstrained one).
* The primary attack effect is the absolute loss increase in nats per token; the relative
  increase divides by the clean loss and flatters the weaker model, so it comes second.
* Across seeds: mean ± std (ddof=1) and a Student-t 95% interval; paired t-test (primary) and
  Wilcoxon signed-rank test. With one seed the interval comes from the examples (bootstrap over
  attacked texts or evaluation documents) and the paired tests are over examples within that
  seed, which says nothing about the variation between training seeds; the report says so.
* The constrained arm has non-negative FFN weights (W = softplus(V)); it is not a monotone model,
  and the measured monotonicity violation rates are reported next to that statement.

Inputs are plain dicts (see `SeedData` in `monolm.stages.aggregate`), so this module does no I/O
and can be tested on hand-made numbers.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats as sps

from monolm import stats
from monolm.runtime import derive_seed

SCHEMA_VERSION = 1
ALPHA = 0.05
CONFIDENCE = 0.95
ARMS = ("baseline", "monotonic")
MODELS = ("base", "baseline", "monotonic")
ATTACKS = {"uat": "UAT", "hotflip": "HotFlip"}
ARM_LABEL = {"base": "base (pre-trained)", "baseline": "baseline", "monotonic": "monotonic (non-negative FFN weights)"}
EVAL_KEYS = ("token_perplexity", "loss", "bits_per_byte", "byte_perplexity", "word_perplexity", "tokens", "docs")
ATTACK_KEYS = ("abs_increase", "rel_increase", "success_rate", "clean_loss", "attacked_loss")
# metrics whose per-example values are in `per_example.json` ({arm: {clean: [...], attacked: [...]}})
EXAMPLE_METRICS = ("abs_increase", "rel_increase", "clean_loss", "attacked_loss")
TRAIN_KEYS = ("steps", "tokens_seen", "lr", "effective_batch_size")
CONSTRAIN_KEYS = ("n_modules", "constrained_params", "share_of_params", "frac_negative_before", "rel_change")
METRIC_LABEL = {
    "token_perplexity": "held-out token perplexity",
    "loss": "held-out loss (nats/token)",
    "bits_per_byte": "bits per byte",
    "abs_increase": "absolute loss increase (nats/token)",
    "rel_increase": "relative loss increase",
    "success_rate": "success rate",
    "control_abs_increase": "random-control absolute loss increase (nats/token)",
}
LOWER_IS_BETTER = {"token_perplexity", "loss", "bits_per_byte"}  # quality metrics


# --------------------------------------------------------------------------- per-seed values
def example_effects(per_example: dict[str, Any], arm: str) -> dict[str, np.ndarray]:
    """Per-text clean/attacked losses of one arm and the effects derived from them."""
    rec = per_example[arm]
    clean = np.asarray(rec["clean"], dtype=float)
    attacked = np.asarray(rec["attacked"], dtype=float)
    if clean.shape != attacked.shape or clean.ndim != 1:
        raise ValueError(f"per_example[{arm!r}]: clean and attacked must be equally long lists")
    return {"clean_loss": clean, "attacked_loss": attacked, "abs_increase": attacked - clean,
            "rel_increase": (attacked - clean) / clean}


def doc_losses(evaluation: dict[str, Any], model: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(nll, tokens) per evaluation document when stage 4 stored them, else None."""
    per_doc = evaluation.get("models", {}).get(model, {}).get("per_doc")
    if not per_doc:
        return None
    return (np.asarray([d["nll"] for d in per_doc], dtype=float), np.asarray([d["tokens"] for d in per_doc], dtype=float))


def monotonicity_rates(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Pool `monolm.monotonicity` rows per (role, sublayer): coordinate violations over all
    coordinates, pair violations over all pairs, and the largest relative drop."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(str(row.get("role")), str(row.get("sublayer")))].append(row)
    out: dict[str, float] = {}
    for (role, sublayer), items in groups.items():
        coords = sum(r.get("n_coords", 0) for r in items)
        pairs = sum(r.get("n_pairs", 0) for r in items)
        prefix = f"monotonicity_{role}_{sublayer}"
        if coords:
            out[f"{prefix}_coord_violation_rate"] = sum(r["coord_violation_rate"] * r["n_coords"] for r in items) / coords
        if pairs:
            out[f"{prefix}_pair_violation_rate"] = sum(r["pair_violation_rate"] * r["n_pairs"] for r in items) / pairs
        out[f"{prefix}_max_relative_drop"] = max(float(r.get("max_relative_drop", 0.0)) for r in items)
    return out


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    return float(value)


def seed_values(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Every number of one seed as flat records {seed, stage, model, metric, value}. `model` is
    the arm (base/baseline/monotonic), None for a stage-level number (e.g. its wall time)."""
    seed = int(data["seed"])
    out: list[dict[str, Any]] = []

    def add(stage: str, model: str | None, metric: str, value: Any) -> None:
        number = _number(value)
        if number is not None:
            out.append({"seed": seed, "stage": stage, "model": model, "metric": metric, "value": number})

    stages = data.get("stages", {})
    cr = data.get("constrain")
    if cr:
        summary = cr.get("summary") or {}
        for key in CONSTRAIN_KEYS:
            add("constrain", "monotonic", key, summary.get(key))
        for key, value in (cr.get("drift") or {}).items():
            add("constrain", "monotonic", f"drift_{key}", value)
        add("constrain", "monotonic", "min_constrained_weight", cr.get("min_constrained_weight"))
        for key, value in monotonicity_rates(cr.get("monotonicity") or []).items():
            add("constrain", "monotonic", key, value)
    for arm in ARMS:
        stage = f"train_{arm}"
        if stage in stages:
            metrics = stages[stage]["metrics"]
            for key in TRAIN_KEYS:
                add(stage, arm, key, metrics.get(key))
            for key, value in (metrics.get("final") or {}).items():
                add(stage, arm, f"final_{key}", value)
            add(stage, arm, "wall_time_s", stages[stage].get("wall_time_s"))
    ev = data.get("evaluation")
    if ev:
        for model in MODELS:
            for key in EVAL_KEYS:
                add("evaluate", model, key, (ev.get("models") or {}).get(model, {}).get(key))
        add("evaluate", "monotonic", "min_constrained_weight", ev.get("min_constrained_weight"))
        for key, value in monotonicity_rates(ev.get("monotonicity") or []).items():
            add("evaluate", "monotonic", key, value)
    for attack in ATTACKS:
        if attack not in stages:
            continue
        metrics = stages[attack]["metrics"]
        for prefix, block in (("", metrics.get("per_model")), ("control_", metrics.get("control"))):
            for arm, rec in (block or {}).items():
                for key in ATTACK_KEYS:
                    add(attack, arm, prefix + key, rec.get(key))
                    ci = rec.get(f"{key}_ci") or [None, None]
                    add(attack, arm, f"{prefix}{key}_ci_low", ci[0])
                    add(attack, arm, f"{prefix}{key}_ci_high", ci[1])
                add(attack, arm, prefix + "n_texts", rec.get("n"))
        for arm, value in (metrics.get("mean_flips") or {}).items():
            add(attack, arm, "mean_flips", value)
        for source, row in (metrics.get("transfer") or {}).items():
            for target, value in row.items():
                add(attack, target, f"transfer_from_{source}", value)
    for stage in ("setup", "constrain", "evaluate", *ATTACKS):
        if stage in stages:
            add(stage, None, "wall_time_s", stages[stage].get("wall_time_s"))
    return out


# --------------------------------------------------------------------------- summaries
def _bootstrap_seed(seed: int, *tags: str) -> int:
    return derive_seed(seed, "aggregate", *tags)


def token_weighted_ci(nll: np.ndarray, tokens: np.ndarray, *, seed: int, perplexity: bool) -> tuple[float, float] | None:
    """Bootstrap (BCa, resampling documents) CI of the token-weighted loss or perplexity."""
    if nll.size < 2:
        return None

    def statistic(n: np.ndarray, t: np.ndarray, axis: int = -1) -> np.ndarray:
        loss = n.sum(axis=axis) / t.sum(axis=axis)
        return np.exp(loss) if perplexity else loss

    res = sps.bootstrap((nll, tokens), statistic, paired=True, vectorized=True, n_resamples=10000,
                        confidence_level=CONFIDENCE, method="BCa", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _single_seed_ci(data: dict[str, Any], stage: str, model: str | None, metric: str) -> tuple[Any, str | None, int | None]:
    """The CI of a one-seed value from its examples: (ci or None, method, n examples)."""
    seed = int(data["seed"])
    if stage in ATTACKS and model in ARMS:
        per_example = (data.get("per_example") or {}).get(stage) or {}
        if metric in EXAMPLE_METRICS and model in per_example:
            values = example_effects(per_example, model)[metric]
            ci = stats.bootstrap_ci(values, seed=_bootstrap_seed(seed, stage, model, metric), confidence=CONFIDENCE)
            return ci, "bootstrap BCa over texts", int(values.size)
        block, key = ("control", metric[len("control_"):]) if metric.startswith("control_") else ("per_model", metric)
        rec = ((data["stages"][stage]["metrics"].get(block) or {}).get(model)) or {}
        ci = rec.get(f"{key}_ci")
        if key in ATTACK_KEYS and ci and None not in ci:
            method = "Wilson score interval over texts" if key == "success_rate" else "bootstrap BCa over texts"
            return (float(ci[0]), float(ci[1])), f"{method} (stage {stage})", rec.get("n")
    if stage == "evaluate" and metric in ("token_perplexity", "loss") and data.get("evaluation"):
        docs = doc_losses(data["evaluation"], model or "")
        if docs is not None:
            ci = token_weighted_ci(*docs, seed=_bootstrap_seed(seed, stage, model or "", metric),
                                   perplexity=metric == "token_perplexity")
            return ci, "bootstrap BCa over documents", int(docs[0].size)
    return None, None, None


def summarize_values(values: Sequence[dict[str, Any]], seeds: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (stage, model, metric): n seeds, mean, std, 95% CI and how it was obtained."""
    by_seed = {int(d["seed"]): d for d in seeds}
    groups: dict[tuple[str, str | None, str], list[dict[str, Any]]] = {}
    for rec in values:
        groups.setdefault((rec["stage"], rec["model"], rec["metric"]), []).append(rec)
    out = []
    for (stage, model, metric), items in groups.items():
        s = stats.summarize([r["value"] for r in items], confidence=CONFIDENCE)
        rec = {"stage": stage, "model": model, "metric": metric, "n": s["n"], "seeds": [r["seed"] for r in items],
               "values": [r["value"] for r in items], "mean": s["mean"], "std": s["std"], "sem": s["sem"],
               "ci_low": s["ci_low"], "ci_high": s["ci_high"], "ci_method": None, "n_examples": None,
               "reason": s["reason"]}
        if s["n"] >= 2 and s["ci_low"] is not None:
            rec["ci_method"] = f"t-interval over seeds (n={s['n']})"
        elif s["n"] == 1:
            ci, method, n_examples = _single_seed_ci(by_seed[items[0]["seed"]], stage, model, metric)
            if ci is not None:
                rec.update(ci_low=ci[0], ci_high=ci[1], ci_method=f"{method} (one seed, n={n_examples})",
                           n_examples=n_examples, reason="one seed: the interval is over examples, not seeds")
        out.append(rec)
    return out


# --------------------------------------------------------------------------- comparisons
@dataclass
class Comparison:
    stage: str
    metric: str
    a: str
    b: str
    scope: str  # "seeds", "texts" or "documents"
    seed: int | None  # None across seeds; the seed for a within-seed test
    result: dict[str, Any]
    label: str = ""

    def to_json(self) -> dict[str, Any]:
        sentence = stats.describe_difference(self.a, self.b, self.label or self.metric, self.result, ALPHA, unit=self.scope)
        return {"stage": self.stage, "metric": self.metric, "a": self.a, "b": self.b, "scope": self.scope,
                "seed": self.seed, **{k: v for k, v in self.result.items() if k != "test_names"},
                "test": stats.TEST_NAMES["t"], "secondary_test": stats.TEST_NAMES["wilcoxon"], "sentence": sentence}


ACROSS_SEEDS = (("evaluate", "token_perplexity"), ("evaluate", "loss"), ("evaluate", "bits_per_byte"),
                ("uat", "abs_increase"), ("uat", "rel_increase"), ("uat", "success_rate"),
                ("hotflip", "abs_increase"), ("hotflip", "rel_increase"), ("hotflip", "success_rate"),
                ("hotflip", "control_abs_increase"))


def _label(stage: str, metric: str) -> str:
    name = ATTACKS.get(stage, "")
    return f"{name} {METRIC_LABEL.get(metric, metric)}".strip()


def compare_arms(values: Sequence[dict[str, Any]], seeds: Sequence[dict[str, Any]]) -> list[Comparison]:
    """Paired tests monotonic vs baseline: across seeds (n >= 2 seeds), and within every seed
    across its examples (the same texts/documents in the same order for both arms)."""
    lookup = {(r["seed"], r["stage"], r["model"], r["metric"]): r["value"] for r in values}
    seed_ids = [int(d["seed"]) for d in seeds]
    out: list[Comparison] = []
    # Across seeds only where at least 2 seeds have both values (a stage may be missing in some seeds).
    for stage, metric in ACROSS_SEEDS:
        pairs = [(lookup[(s, stage, "monotonic", metric)], lookup[(s, stage, "baseline", metric)]) for s in seed_ids
                 if (s, stage, "monotonic", metric) in lookup and (s, stage, "baseline", metric) in lookup]
        if len(pairs) >= 2:
            mono, base = zip(*pairs)
            out.append(Comparison(stage, metric, "monotonic", "baseline", "seeds", None,
                                  stats.paired_test(mono, base, alpha=ALPHA, confidence=CONFIDENCE), _label(stage, metric)))
    for arm in ARMS:  # does the gradient search beat query-only random search? (gradient masking check)
        pairs = [(lookup[(s, "hotflip", arm, "abs_increase")], lookup[(s, "hotflip", arm, "control_abs_increase")])
                 for s in seed_ids if (s, "hotflip", arm, "control_abs_increase") in lookup
                 and (s, "hotflip", arm, "abs_increase") in lookup]
        if len(pairs) >= 2:
            grad, ctrl = zip(*pairs)
            out.append(Comparison("hotflip", f"gradient_vs_control_{arm}", "gradient HotFlip", "random control",
                                  "seeds", None, stats.paired_test(grad, ctrl, alpha=ALPHA, confidence=CONFIDENCE),
                                  f"{arm} arm absolute loss increase (nats/token)"))
    for data in seeds:
        seed = int(data["seed"])
        for stage in ATTACKS:
            per_example = (data.get("per_example") or {}).get(stage)
            if not per_example or not all(arm in per_example for arm in ARMS):
                continue
            mono, base = example_effects(per_example, "monotonic"), example_effects(per_example, "baseline")
            for metric in ("abs_increase", "rel_increase"):
                out.append(Comparison(stage, metric, "monotonic", "baseline", "texts", seed,
                                      stats.paired_test(mono[metric], base[metric], alpha=ALPHA, confidence=CONFIDENCE),
                                      f"{_label(stage, metric)} (seed {seed})"))
        ev = data.get("evaluation")
        if ev:
            mono_docs, base_docs = doc_losses(ev, "monotonic"), doc_losses(ev, "baseline")
            if mono_docs is not None and base_docs is not None:
                out.append(Comparison("evaluate", "doc_loss", "monotonic", "baseline", "documents", seed,
                                      stats.paired_test(mono_docs[0] / mono_docs[1], base_docs[0] / base_docs[1],
                                                        alpha=ALPHA, confidence=CONFIDENCE),
                                      f"per-document loss (nats/token, seed {seed})"))
    return out


# --------------------------------------------------------------------------- findings
def _direction_words(stage: str, metric: str, diff: float) -> str:
    if metric in LOWER_IS_BETTER or stage == "evaluate":  # quality (perplexity or per-document loss)
        return ("the constrained arm has higher held-out loss than the baseline (the constraint costs quality)"
                if diff > 0 else "the constrained arm has lower held-out loss than the baseline")
    attack = ATTACKS.get(stage, stage)
    if diff > 0:
        return f"{attack} did more damage to the constrained arm than to the baseline (less robust by this measure)"
    return f"{attack} did less damage to the constrained arm than to the baseline (more robust by this measure)"


def finding(comp: dict[str, Any], *, headline: str) -> str:
    """One finding sentence from a comparison record: verdict words from its numbers, then the test."""
    if comp["mean_diff"] is None:
        return f"{headline}: no data. {comp['sentence']}."
    if comp["significant"]:
        lead = _direction_words(comp["stage"], comp["metric"], comp["mean_diff"])
    else:
        lead = "no significant difference between the constrained arm and the baseline"
    return f"{headline}: {lead}. {comp['sentence']}."


def findings(results: dict[str, Any]) -> list[str]:
    """The report's finding sentences, in reading order: quality, then absolute attack effects,
    then relative effects and success rates, then the gradient-vs-control check."""
    comps = results["comparisons"]
    out: list[str] = []
    order = [("evaluate", "token_perplexity"), ("uat", "abs_increase"), ("hotflip", "abs_increase"),
             ("uat", "rel_increase"), ("hotflip", "rel_increase"), ("uat", "success_rate"), ("hotflip", "success_rate")]
    for stage, metric in order:
        headline = f"{ATTACKS[stage]} {METRIC_LABEL[metric]}" if stage in ATTACKS else METRIC_LABEL[metric].capitalize()
        across = [c for c in comps if c["stage"] == stage and c["metric"] == metric and c["scope"] == "seeds"]
        within = [c for c in comps if c["stage"] == stage and c["metric"] == metric and c["scope"] != "seeds"]
        if stage == "evaluate":  # within a seed, quality is compared per document
            within = [c for c in comps if c["stage"] == "evaluate" and c["metric"] == "doc_loss"]
        if across:
            sentence = finding(across[0], headline=headline)
            if within:
                higher = sum(c["significant"] and (c["mean_diff"] or 0) > 0 for c in within)
                lower = sum(c["significant"] and (c["mean_diff"] or 0) < 0 for c in within)
                sentence += (f" Within single seeds (paired t-tests over {within[0]['scope']}), the difference was "
                             f"significant in {higher + lower} of {len(within)} seeds"
                             + (f" ({higher} with the constrained arm higher, {lower} lower)" if higher + lower else "")
                             + ".")
            out.append(sentence)
        elif within:
            for comp in within:
                out.append(finding(comp, headline=headline) + (
                    f" This test is within seed {comp['seed']} (the only seed with this measurement): it is over "
                    f"{comp['scope']} for one trained pair of models and says nothing about variation between "
                    "training seeds."))
        elif metric in ("token_perplexity", "abs_increase"):
            means = {r["model"]: r for r in results["summaries"] if r["stage"] == stage and r["metric"] == metric}
            if means:
                n = max(r["n"] for r in means.values())
                shown = ", ".join(f"{m} {_fmt(means[m]['mean'])}" for m in MODELS if m in means)
                out.append(f"{headline}: {shown} (n={n} seed{'s' if n != 1 else ''}); no paired test possible "
                           "(fewer than 2 seeds and no per-example values), so no difference is claimed.")
    out.extend(_disagreement(comps, results["summaries"]))
    for comp in comps:
        if comp["metric"].startswith("gradient_vs_control_"):
            arm = comp["metric"].removeprefix("gradient_vs_control_")
            if comp["significant"] and comp["mean_diff"] > 0:
                lead = "the gradient-guided search beat the query-only random search"
            elif comp["significant"]:
                lead = "the query-only random search beat the gradient-guided search (a sign of gradient masking)"
            else:
                lead = "the gradient-guided search did not differ significantly from query-only random search"
            out.append(f"HotFlip vs its random-candidate control on the {arm} arm: {lead}. {comp['sentence']}.")
    return out


def _disagreement(comps: Sequence[dict[str, Any]], summaries: Sequence[dict[str, Any]]) -> list[str]:
    """Flag attacks where the relative effect says something the absolute one does not: opposite
    directions, or a significant relative difference without a significant absolute one."""
    out = []
    for stage, name in ATTACKS.items():
        primary = [c for c in comps if c["stage"] == stage and c["scope"] == "seeds"] or \
                  [c for c in comps if c["stage"] == stage and c["scope"] == "texts"]
        by_metric = {c["metric"]: c for c in primary}
        a, r = by_metric.get("abs_increase"), by_metric.get("rel_increase")
        if a and r and r["significant"] and not a["significant"]:
            clean = {arm: summary_of(summaries, stage, arm, "clean_loss") for arm in ARMS}
            if all(clean.values()):
                higher = max(ARMS, key=lambda arm: clean[arm]["mean"])
                out.append(f"{name}: the relative loss increase differs significantly between the arms but the absolute "
                           f"one does not. The relative increase divides by the clean loss, which is higher for the "
                           f"{higher} arm (baseline {_fmt(clean['baseline']['mean'])}, monotonic "
                           f"{_fmt(clean['monotonic']['mean'])} nats/token), so the relative difference can come from "
                           "the clean loss alone; the absolute increase is the primary measure.")
        if a and r and a["mean_diff"] and r["mean_diff"] and (a["mean_diff"] > 0) != (r["mean_diff"] > 0):
            out.append(f"{name}: the absolute and relative loss increases point in opposite directions "
                       f"(monotonic − baseline: {_fmt(a['mean_diff'], sign=True)} nats/token absolute, "
                       f"{_fmt(r['mean_diff'], sign=True)} relative). The relative increase divides by the clean "
                       "loss and flatters the model with the higher clean loss; the absolute increase is the "
                       "primary measure.")
    return out


def recipe_statement(meta: dict[str, Any], values: Sequence[dict[str, Any]]) -> str:
    """The training recipe in words, computed from the resolved per-arm settings and checked
    against what the training stages report (tokens seen per arm)."""
    recipe = meta["recipe"]
    arms = meta.get("arms") or {}
    base, mono = arms.get("baseline", {}), arms.get("monotonic", {})
    differing = sorted(k for k in set(base) | set(mono) if base.get(k) != mono.get(k))
    if recipe == "fair":
        text = ("Training recipe: **fair** — both arms were trained with identical data, token budget, optimizer and "
                f"schedule (lr={base.get('lr')}, schedule={base.get('schedule')}, max_steps={base.get('max_steps')}, "
                f"effective batch={base.get('micro_batch_size', 0) * base.get('grad_accum_steps', 0)} sequences).")
    else:
        what = "the original study's asymmetric recipe" if recipe == "reference" else "a per-arm recipe"
        diffs = "; ".join(f"{k}: baseline {base.get(k)} vs monotonic {mono.get(k)}" for k in differing) or "none"
        text = (f"Training recipe: **{recipe}** ({what}) — the arms were trained differently ({diffs}). Differences "
                "between the arms may come from the recipe rather than from the constraint.")
    tokens: dict[int, dict[str, float]] = defaultdict(dict)
    for r in values:
        if r["metric"] == "tokens_seen" and r["stage"].startswith("train_"):
            tokens[r["seed"]][r["model"]] = r["value"]
    unequal = sorted(s for s, t in tokens.items() if len(t) == 2 and t["baseline"] != t["monotonic"])
    if unequal:
        text += (" Tokens seen differ between the arms in seed(s) "
                 + ", ".join(f"{s} (baseline {tokens[s]['baseline']:.0f}, monotonic {tokens[s]['monotonic']:.0f})"
                             for s in unequal) + ".")
    elif tokens:
        text += " Both arms saw the same number of training tokens in every seed."
    return text


def monotonicity_statement(results: dict[str, Any]) -> str:
    """"Non-negative FFN weights", never "monotone", with the measured violation rates."""
    rows = [r for r in results["summaries"] if r["metric"].startswith("monotonicity_") and r["metric"].endswith(
        "_coord_violation_rate")]
    after = [r for r in rows if r["stage"] == "evaluate"] or [r for r in rows if r["stage"] == "constrain"]
    text = ("The constrained arm has non-negative FFN weights (W = softplus(V)); GELU, LayerNorm, attention and "
            "residual paths keep the model non-monotone, so it is not described as monotone.")
    if after:
        when = "after training" if after[0]["stage"] == "evaluate" else "after constraining (before training)"
        parts = [f"{r['metric'].removeprefix('monotonicity_').removesuffix('_coord_violation_rate').replace('_', ' ')}: "
                 f"{_pct(r['mean'])}" for r in after]
        text += (f" Measured share of output coordinates that decreased when the input increased ({when}, mean over "
                 f"{after[0]['n']} seed{'s' if after[0]['n'] != 1 else ''}): " + "; ".join(parts) + ".")
    return text


# --------------------------------------------------------------------------- the whole analysis
def analyze(seeds: Sequence[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """Everything stage 7 reports, as one JSON-able dict (the content of results.json).

    Every per-seed value, summary and comparison carries the run's variant, preset, recipe,
    config digest and code revision, so a number copied out of the file keeps its provenance.
    """
    seeds = sorted(seeds, key=lambda d: int(d["seed"]))
    tags = {k: meta[k] for k in ("variant", "preset", "recipe", "config_digest", "code_revision")}
    values = [v for data in seeds for v in seed_values(data)]
    summaries = summarize_values(values, seeds)
    comparisons = [c.to_json() for c in compare_arms(values, seeds)]
    results: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "run_name": meta["run_name"],
        "run_id": meta["run_id"],
        "meta": meta,
        "alpha": ALPHA,
        "confidence": CONFIDENCE,
        "values": [{**v, **tags} for v in values],
        "summaries": [{**s, **tags} for s in summaries],
        "comparisons": [{**c, **tags} for c in comparisons],
    }
    results["findings"] = findings(results)
    results["recipe_statement"] = recipe_statement(meta, values)
    results["monotonicity_statement"] = monotonicity_statement(results)
    return results


# --------------------------------------------------------------------------- lookups for renderers
def summary_of(summaries: Sequence[dict[str, Any]], stage: str, model: str | None, metric: str) -> dict[str, Any] | None:
    for rec in summaries:
        if rec["stage"] == stage and rec["model"] == model and rec["metric"] == metric:
            return rec
    return None


def summary(results: dict[str, Any], stage: str, model: str | None, metric: str) -> dict[str, Any] | None:
    return summary_of(results["summaries"], stage, model, metric)


def value(results: dict[str, Any], seed: int, stage: str, model: str | None, metric: str) -> float | None:
    for rec in results["values"]:
        if rec["seed"] == seed and rec["stage"] == stage and rec["model"] == model and rec["metric"] == metric:
            return rec["value"]
    return None


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """Headline numbers (means over seeds, and the primary tests' p-values) for the stage result."""
    out: dict[str, Any] = {"n_seeds": len(results["meta"]["seeds"])}
    for model in MODELS:
        rec = summary(results, "evaluate", model, "token_perplexity")
        if rec:
            out[f"{model}_token_perplexity"] = rec["mean"]
    for attack in ATTACKS:
        for arm in ARMS:
            for metric in ("abs_increase", "rel_increase", "success_rate"):
                rec = summary(results, attack, arm, metric)
                if rec:
                    out[f"{arm}_{attack}_{metric}"] = rec["mean"]
    for comp in results["comparisons"]:
        if comp["scope"] == "seeds" and comp["metric"] in ("token_perplexity", "abs_increase"):
            key = f"{comp['stage']}_{comp['metric']}"
            out[f"{key}_diff"], out[f"{key}_t_p"], out[f"{key}_significant"] = comp["mean_diff"], comp["t_p"], comp["significant"]
    return out


def console_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model for the terminal and the Prefect table artifact (means over seeds)."""
    rows = []
    for model in MODELS:
        ppl = summary(results, "evaluate", model, "token_perplexity")
        row: dict[str, Any] = {"model": model, "seeds": ppl["n"] if ppl else 0,
                               "perplexity": ppl["mean"] if ppl else None}
        for attack in ATTACKS:
            if model in ARMS:
                for metric, col in (("abs_increase", "delta_nats"), ("success_rate", "success")):
                    rec = summary(results, attack, model, metric)
                    row[f"{attack}_{col}"] = rec["mean"] if rec else None
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- formatting
def _fmt(x: float | None, *, sign: bool = False, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if float(x).is_integer() and abs(x) >= 1000:
        return f"{int(x):+,}" if sign else f"{int(x):,}"
    return f"{x:+.{digits}g}" if sign else f"{x:.{digits}g}"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.3g}%"


def _p(p: float | None) -> str:
    if p is None:
        return "—"
    return f"{p:.3g}" if p >= 0.001 else f"{p:.1e}"


def _mean_std(rec: dict[str, Any] | None, pct: bool = False) -> str:
    if rec is None or rec["mean"] is None:
        return "—"
    f = _pct if pct else _fmt
    return f(rec["mean"]) + (f" ± {f(rec['std'])}" if rec["std"] is not None else "")


def _ci(rec: dict[str, Any] | None, pct: bool = False) -> str:
    if rec is None or rec.get("ci_low") is None:
        return "—"
    f = _pct if pct else _fmt
    return f"[{f(rec['ci_low'])}, {f(rec['ci_high'])}]"


@dataclass
class Table:
    key: str
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    note: str = ""


def _ci_note(recs: Iterable[dict[str, Any] | None]) -> str:
    methods = sorted({r["ci_method"] for r in recs if r and r.get("ci_method")})
    return ("95% CI: " + "; ".join(methods) + ".") if methods else "No confidence interval (n=1 seed and no per-example values)."


def tables(results: dict[str, Any]) -> list[Table]:
    """The report's tables, shared by Markdown and LaTeX so the two can never disagree."""
    out: list[Table] = []
    n_seeds = len(results["meta"]["seeds"])
    quality = Table("quality", f"Held-out quality (n = {n_seeds} seed{'s' if n_seeds != 1 else ''})",
                    ["Model", "n", "Token perplexity (mean ± std)", "95% CI", "Loss (nats/token)", "Bits/byte"])
    recs = []
    for model in MODELS:
        ppl = summary(results, "evaluate", model, "token_perplexity")
        if ppl is None:
            continue
        recs.append(ppl)
        quality.rows.append([ARM_LABEL[model], str(ppl["n"]), _mean_std(ppl), _ci(ppl),
                             _mean_std(summary(results, "evaluate", model, "loss")),
                             _mean_std(summary(results, "evaluate", model, "bits_per_byte"))])
    if quality.rows:
        quality.note = _ci_note(recs)
        out.append(quality)

    threshold = results["meta"].get("success_threshold")
    for attack, name in ATTACKS.items():
        t = Table(f"attack-{attack}", f"{name}: effect on the original text tokens (absolute first)",
                  ["Model", "n seeds", "n texts", "Δ loss, nats/token (mean ± std)", "95% CI",
                   "Relative increase", "95% CI", f"Success rate (rel. > {_pct(threshold)})"])
        recs = []
        for prefix, suffix in (("", ""), ("control_", " — random control")):
            for arm in ARMS:
                rec = summary(results, attack, arm, prefix + "abs_increase")
                if rec is None:
                    continue
                recs.append(rec)
                rel = summary(results, attack, arm, prefix + "rel_increase")
                succ = summary(results, attack, arm, prefix + "success_rate")
                n_texts = summary(results, attack, arm, prefix + "n_texts")
                t.rows.append([ARM_LABEL[arm] + suffix, str(rec["n"]), _fmt(n_texts["mean"]) if n_texts else "—",
                               _mean_std(rec), _ci(rec), _mean_std(rel, pct=True), _ci(rel, pct=True),
                               _mean_std(succ, pct=True)])
        if t.rows:
            t.note = _ci_note(recs) + (" The random control is the same greedy search with random (query-only) "
                                       "candidates instead of gradient-ranked ones." if attack == "hotflip" else "")
            out.append(t)

    tests = Table("tests", "Paired tests, monotonic − baseline (primary: paired t-test; also Wilcoxon signed-rank)",
                  ["Metric", "Scope", "n", "Difference", "95% CI", "t-test p", "Wilcoxon p", "Verdict"])
    for c in results["comparisons"]:
        scope = "across seeds" if c["scope"] == "seeds" else f"seed {c['seed']}, over {c['scope']}"
        metric = (f"HotFlip gradient − control ({c['metric'].removeprefix('gradient_vs_control_')})"
                  if c["metric"].startswith("gradient_vs_control_") else _label(c["stage"], c["metric"]))
        verdict = "significant" if c["significant"] else "not significant"
        ci = f"[{_fmt(c['ci_low'])}, {_fmt(c['ci_high'])}]" if c["ci_low"] is not None else "—"
        tests.rows.append([metric, scope, str(c["n"]), _fmt(c["mean_diff"], sign=True), ci, _p(c["t_p"]),
                           _p(c["wilcoxon_p"]), verdict])
    if tests.rows:
        tests.note = (f"α = {ALPHA}; tests are not corrected for multiple comparisons. With n = 5 seeds the exact "
                      "two-sided Wilcoxon p-value cannot be below 0.0625.")
        out.append(tests)

    for attack, name in ATTACKS.items():
        sources = sorted({r["metric"].removeprefix("transfer_from_") for r in results["summaries"]
                          if r["stage"] == attack and r["metric"].startswith("transfer_from_")})
        if not sources:
            continue
        t = Table(f"transfer-{attack}", f"{name} transfer: Δ loss (nats/token) on the target model, mean over seeds",
                  ["Crafted on (row) / evaluated on (column)", *ARMS, "n"])
        for source in sources:
            recs = [summary(results, attack, target, f"transfer_from_{source}") for target in ARMS]
            t.rows.append([source, *(_mean_std(r) for r in recs), str(max((r["n"] for r in recs if r), default=0))])
        out.append(t)

    mono = [r for r in results["summaries"] if r["metric"].startswith("monotonicity_")
            and r["metric"].endswith("_coord_violation_rate")]
    if mono:
        t = Table("monotonicity", "Empirical monotonicity violations of the constrained sublayers "
                  "(share of output coordinates that decreased when the input increased)",
                  ["When", "Sublayer", "n seeds", "Coordinate rate", "Pair rate", "Max relative drop"])
        for r in mono:
            base = r["metric"].removesuffix("_coord_violation_rate")
            when = "after training" if r["stage"] == "evaluate" else "after constraining"
            t.rows.append([when, base.removeprefix("monotonicity_").replace("_", " "), str(r["n"]), _mean_std(r, pct=True),
                           _mean_std(summary(results, r["stage"], r["model"], base + "_pair_violation_rate"), pct=True),
                           _mean_std(summary(results, r["stage"], r["model"], base + "_max_relative_drop"))])
        t.note = ("'linear' is the constrained Linear alone (must be 0); 'block' is the enclosing FFN/attention block as "
                  "the model computes it, which non-negative weights do not make monotone.")
        out.append(t)

    cons = Table("constraint", "What constraining did (stage 1, before training)", ["Quantity", "n seeds", "Mean ± std"])
    for metric, label in (("share_of_params", "share of parameters constrained"),
                          ("frac_negative_before", "fraction of constrained weights negative before"),
                          ("rel_change", "relative change of the constrained weights"),
                          ("drift_kl_mean", "KL(base ‖ constrained) per token, nats"),
                          ("drift_ppl_ratio", "perplexity ratio constrained/base"),
                          ("min_constrained_weight", "minimum constrained weight")):
        rec = summary(results, "constrain", "monotonic", metric)
        if rec:
            cons.rows.append([label, str(rec["n"]), _mean_std(rec)])
    rec = summary(results, "evaluate", "monotonic", "min_constrained_weight")
    if rec:
        cons.rows.append(["minimum constrained weight after training", str(rec["n"]), _mean_std(rec)])
    if cons.rows:
        out.append(cons)

    train = Table("training", "Training of both arms", ["Arm", "n seeds", "Steps", "Tokens seen", "lr",
                                                         "Final val. perplexity", "Best val. perplexity", "Wall time (s)"])
    for arm in ARMS:
        stage = f"train_{arm}"
        steps = summary(results, stage, arm, "steps")
        if steps is None:
            continue
        train.rows.append([ARM_LABEL[arm], str(steps["n"]), _mean_std(steps),
                           _mean_std(summary(results, stage, arm, "tokens_seen")),
                           _mean_std(summary(results, stage, arm, "lr")),
                           _mean_std(summary(results, stage, arm, "final_val_perplexity")),
                           _mean_std(summary(results, stage, arm, "final_best_val_perplexity")),
                           _mean_std(summary(results, stage, arm, "wall_time_s"))])
    if train.rows:
        out.append(train)

    per_seed = Table("per-seed", "Per-seed values", ["Seed", "PPL baseline", "PPL monotonic", "UAT Δ baseline",
                                                     "UAT Δ monotonic", "HotFlip Δ baseline", "HotFlip Δ monotonic"])
    for seed in results["meta"]["seeds"]:
        per_seed.rows.append([str(seed), *(_fmt(value(results, seed, stage, arm, metric)) for stage, metric in
                                           (("evaluate", "token_perplexity"), ("uat", "abs_increase"),
                                            ("hotflip", "abs_increase")) for arm in ARMS)])
    per_seed.note = "Δ: absolute loss increase in nats/token on the attacked texts."
    out.append(per_seed)
    return out


# --------------------------------------------------------------------------- renderers
def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def table_markdown(t: Table) -> str:
    lines = [f"**{t.title}**", "", "| " + " | ".join(_md_cell(c) for c in t.columns) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(t.columns))) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
    if t.note:
        lines += ["", f"_{t.note}_"]
    return "\n".join(lines)


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "−": r"$-$",
        "Δ": r"$\Delta$", "α": r"$\alpha$", "‖": r"$\Vert$", "—": "---", "≥": r"$\geq$", "·": r"$\cdot$",
        ">": r"$>$", "<": r"$<$", "|": r"$\vert$"}


def tex_escape(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in text)


def table_latex(t: Table) -> str:
    """A booktabs table (needs \\usepackage{booktabs}); the caption states n."""
    spec = "l" + "r" * (len(t.columns) - 1)
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             rf"\caption{{{tex_escape(t.title)}}}", rf"\label{{tab:{t.key}}}",
             rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(tex_escape(c) for c in t.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(tex_escape(c) for c in row) + r" \\" for row in t.rows]
    lines.append(r"\bottomrule")
    lines.append(r"\end{tabular}")
    if t.note:
        lines.append(rf"\par\smallskip\footnotesize {tex_escape(t.note)}")
    lines.append(r"\end{table}")
    return "\n".join(lines)


def latex(results: dict[str, Any]) -> str:
    meta = results["meta"]
    head = (f"% monolm results: {meta['run_name']} (config digest {meta['config_digest']}, "
            f"code {meta['code_revision']}). Requires \\usepackage{{booktabs}}.\n")
    return head + "\n\n".join(table_latex(t) for t in tables(results)) + "\n"


CSV_COLUMNS = ("stage", "model", "metric", "n", "mean", "std", "ci_low", "ci_high", "ci_method", "seeds", "values",
               "variant", "preset", "recipe", "config_digest", "code_revision")


def summary_csv(results: dict[str, Any]) -> str:
    """One row per (stage, model, metric): n seeds, mean, std, CI and the per-seed values."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for rec in results["summaries"]:
        row = {k: rec.get(k) for k in CSV_COLUMNS}
        row["seeds"] = " ".join(str(s) for s in rec["seeds"])
        row["values"] = " ".join(repr(v) for v in rec["values"])
        writer.writerow(row)
    return buffer.getvalue()


def markdown(results: dict[str, Any], *, plots: dict[str, str], config_yaml: str, config_path: str) -> str:
    """report.md: recipe and provenance first, then findings, tables, plots, methods, config."""
    meta = results["meta"]
    n = len(meta["seeds"])
    lines = [f"# monolm results: {meta['run_name']}", "",
             f"> {results['recipe_statement']}", "",
             f"- Question: does constraining the FFN weights to be non-negative make the model harder to attack, "
             f"and what does it cost?",
             f"- Model: `{meta['model']}` (preset `{meta['preset']}`); constraint variant `{meta['variant']}` "
             f"(init `{meta.get('init')}`): non-negative FFN weights.",
             f"- Seeds: {', '.join(str(s) for s in meta['seeds'])} (n = {n}).",
             *([f"- **Status: partial** — {meta['incomplete']}."] if meta.get("incomplete") else []),
             f"- Config digest `{meta['config_digest']}`; full config: `{config_path}` (also at the end of this report).",
             f"- Code revision: `{meta['code_revision']}`"
             + (f" (stage outputs were produced at: {', '.join('`' + r + '`' for r in meta['stage_revisions'])})"
                if meta.get("stage_revisions") and meta["stage_revisions"] != [meta["code_revision"]] else "") + ".",
             "", "## Findings", ""]
    lines += [f"- {s}" for s in results["findings"]] or ["- No comparisons could be computed."]
    lines += ["", f"- {results['monotonicity_statement']}", ""]
    sections = {"quality": "Quality", "attack-uat": "Robustness", "attack-hotflip": "Robustness",
                "tests": "Paired tests", "transfer-uat": "Transfer", "transfer-hotflip": "Transfer",
                "monotonicity": "The constraint", "constraint": "The constraint", "training": "Training",
                "per-seed": "Per-seed values"}
    done: set[str] = set()
    for t in tables(results):
        heading = sections.get(t.key, t.title)
        if heading not in done:
            lines += [f"## {heading}", ""]
            done.add(heading)
        lines += [table_markdown(t), ""]
    if plots:
        lines += ["## Plots", ""]
        captions = {"perplexity": "Held-out token perplexity per arm (points: seeds; bars: 95% CI)",
                    "attacks": "Absolute loss increase under attack per arm, nats/token (95% CIs; HotFlip with its random control)",
                    "training": "Training curves of both arms (validation perplexity and training loss vs tokens seen)"}
        for name, rel in plots.items():
            lines += [f"![{captions.get(name, name)}]({rel})", "", f"_{captions.get(name, name)}._", ""]
    lines += ["## Methods", "",
              "- Differences are monotonic − baseline. Across seeds: mean ± std (ddof = 1), Student-t 95% CI, paired "
              "t-test (primary, decides significance) and Wilcoxon signed-rank test (scipy.stats). Within a seed: the "
              "same paired tests over the attacked texts (identical texts, same order, for both arms).",
              "- With one seed, confidence intervals are bootstrap (BCa, 10,000 resamples, seeded) over texts or "
              "documents; they describe one trained pair of models, not variation between training seeds.",
              f"- Attack effects are measured on the original text tokens only (trigger and flipped tokens are never "
              f"scored). The absolute loss increase (nats/token) is primary; relative increase and success rate "
              f"(relative increase above {_pct(meta.get('success_threshold'))}) are secondary.",
              f"- Significance level α = {ALPHA}; no correction for multiple comparisons.", "",
              "## Configuration", "", "```yaml", config_yaml.rstrip(), "```", ""]
    return "\n".join(lines)
