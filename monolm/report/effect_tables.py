"""The tables of what the study measured: held-out quality per model, each attack's effect per arm
(with its random control and the mean over restarts), the paired tests and the transfer of an
attack crafted on one arm to the other."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from monolm.report.formatting import fmt_ci, fmt_mean_std, fmt_num, fmt_p, fmt_pct
from monolm.report.held_out import part_note, window_sentence
from monolm.report.labels import ARM_LABEL, ARMS, ATTACKS, MODELS, metric_label
from monolm.report.summaries import ALPHA, summary
from monolm.report.table_base import Table, ci_note
from monolm.report.verdicts import mde_clause


def quality_table(results: dict[str, Any]) -> Table | None:
    """Held-out perplexity, loss and bits per byte of every model."""
    n_seeds = len(results["meta"]["seeds"])
    quality = Table(
        "quality",
        f"Held-out quality on the test part (n = {n_seeds} seed{'s' if n_seeds != 1 else ''})",
        ["Model", "n", "Token perplexity (mean ± std)", "95% CI", "Loss (nats/token)", "Bits/byte"],
    )
    recs = []
    for model in MODELS:
        ppl = summary(results, "evaluate", model, "token_perplexity")
        if ppl is None:
            continue
        recs.append(ppl)
        quality.rows.append(
            [
                ARM_LABEL[model],
                str(ppl["n"]),
                fmt_mean_std(ppl),
                fmt_ci(ppl),
                fmt_mean_std(summary(results, "evaluate", model, "loss")),
                fmt_mean_std(summary(results, "evaluate", model, "bits_per_byte")),
            ]
        )
    if not quality.rows:
        return None
    facts = results.get("held_out")
    quality.note = " ".join(
        s
        for s in (
            part_note(facts, "test"),
            "Disjoint from the validation part that selected the checkpoints." if facts else "",
            window_sentence((facts or {}).get("window")),
            ci_note(recs),
        )
        if s
    )
    return quality


def _attack_row(results: dict[str, Any], attack: str, arm: str, prefix: str, rec: dict[str, Any]) -> list[str]:
    rel = summary(results, attack, arm, prefix + "rel_increase")
    succ = summary(results, attack, arm, prefix + "success_rate")
    n_texts = summary(results, attack, arm, prefix + "n_texts")
    return [
        str(rec["n"]),
        fmt_num(n_texts["mean"]) if n_texts else "—",
        fmt_mean_std(rec),
        fmt_ci(rec),
        fmt_mean_std(rel, pct=True),
        fmt_ci(rel, pct=True),
        fmt_mean_std(succ, pct=True),
    ]


def _attack_note(results: dict[str, Any], attack: str) -> str:
    """What the control and restart rows of an attack's table are, where it has them."""
    note = ""
    if any(summary(results, attack, arm, "control_abs_increase") for arm in ARMS):
        note += (
            " The random control is the same search with random (query-only) candidates instead of "
            "gradient-ranked ones, at the same number of scored candidates."
        )
    if any(summary(results, attack, arm, "restart_mean_abs_increase") for arm in ARMS):
        note += (
            " Universal triggers: the first row per arm is the best of the restarts (the attacker's view, chosen on "
            "the optimisation texts), 'mean over restarts' scores every restart's trigger on every held-out text and "
            "averages per text; the paired arm test on it (restart_mean_abs_increase) is over these per-text means, "
            "so it carries both the text and the restart variance."
        )
    return note


def attack_table(results: dict[str, Any], attack: str) -> Table | None:
    """One attack's effect per arm (absolute first), then its random control where it has one."""
    name = ATTACKS[attack]
    threshold = results["meta"].get("success_threshold")
    t = Table(
        f"attack-{attack}",
        f"{name}: effect on the original text tokens (absolute first)",
        [
            "Model",
            "n seeds",
            "n texts",
            "Δ loss, nats/token (mean ± std)",
            "95% CI",
            "Relative increase",
            "95% CI",
            f"Success rate (rel. > {fmt_pct(threshold)})",
        ],
    )
    recs = []
    for prefix, suffix in (("", ""), ("restart_mean_", " — mean over restarts"), ("control_", " — random control")):
        for arm in ARMS:
            rec = summary(results, attack, arm, prefix + "abs_increase")
            if rec is None:
                continue
            recs.append(rec)
            t.rows.append([ARM_LABEL[arm] + suffix, *_attack_row(results, attack, arm, prefix, rec)])
    if not t.rows:
        return None
    t.note = ci_note(recs) + _attack_note(results, attack)
    if results.get("held_out"):
        t.note += " Texts from the attack part, disjoint from the validation and test parts."
    return t


def _test_row(c: dict[str, Any]) -> list[str]:
    scope = "across seeds" if c["scope"] == "seeds" else f"seed {c['seed']}, over {c['scope']}"
    metric = (
        f"{ATTACKS.get(c['stage'], c['stage'])} gradient − control ({c['metric'].removeprefix('gradient_vs_control_')})"
        if c["metric"].startswith("gradient_vs_control_")
        else metric_label(c["stage"], c["metric"])
    )
    verdict = "significant" if c["significant"] else f"not significant{mde_clause(c)}"
    if c.get("role") == "primary":
        holm = "significant" if c.get("significant_holm") else "not significant"
        verdict = f"primary: {holm} (Holm p={fmt_p(c.get('p_holm'))})"
    elif c.get("role") == "damage" and c.get("p_holm") is not None:  # its own family (damage_arm)
        holm = "significant" if c.get("significant_holm") else "not significant"
        verdict = f"vs damage-matched: {holm} (Holm p={fmt_p(c['p_holm'])})"
    elif c.get("role") in ("secondary", "supporting"):
        verdict = f"{c['role']}, uncorrected: {verdict}"
    ci = f"[{fmt_num(c['ci_low'])}, {fmt_num(c['ci_high'])}]" if c["ci_low"] is not None else "—"
    return [
        metric,
        scope,
        str(c["n"]),
        fmt_num(c["mean_diff"], sign=True),
        ci,
        fmt_p(c["t_p"]),
        fmt_p(c["wilcoxon_p"]),
        verdict,
    ]


def tests_table(results: dict[str, Any]) -> Table | None:
    """Every paired test: difference, its CI, both p-values and the verdict."""
    tests = Table(
        "tests",
        "Paired tests, monotonic − baseline (primary: paired t-test; also Wilcoxon signed-rank)",
        ["Metric", "Scope", "n", "Difference", "95% CI", "t-test p", "Wilcoxon p", "Verdict"],
    )
    tests.rows = [_test_row(c) for c in results["comparisons"]]
    if not tests.rows:
        return None
    tests.note = (
        f"α = {ALPHA}. Primary tests (test loss, each attack's absolute loss increase) are Holm-corrected over "
        "the report's primary family; secondary and supporting tests are shown uncorrected and give no verdict."
    ) + wilcoxon_floor_note(results["comparisons"])
    return tests


def wilcoxon_floor_note(comparisons: Iterable[dict[str, Any]]) -> str:
    """For tests across so few seeds that the exact two-sided Wilcoxon p-value cannot reach α
    (its smallest value is 2 / 2^n): say so, with the actual n. Nothing otherwise."""
    notes = []
    for n in sorted({c["n"] for c in comparisons if c["scope"] == "seeds" and c.get("wilcoxon_p") is not None}):
        floor = 2.0 / 2**n
        if floor > ALPHA:
            notes.append(
                f" With n = {n} seeds the exact two-sided Wilcoxon p-value cannot be below {fmt_p(floor)}, so "
                f"the Wilcoxon test cannot reach α = {ALPHA} across seeds."
            )
    return "".join(notes)


def transfer_table(results: dict[str, Any], attack: str) -> Table | None:
    """Damage of the attack crafted on one arm (row) to each arm (column)."""
    sources = sorted(
        {
            r["metric"].removeprefix("transfer_from_")
            for r in results["summaries"]
            if r["stage"] == attack and r["metric"].startswith("transfer_from_")
        }
    )
    if not sources:
        return None
    t = Table(
        f"transfer-{attack}",
        f"{ATTACKS[attack]} transfer: Δ loss (nats/token) on the target model, mean over seeds",
        ["Crafted on (row) / evaluated on (column)", *ARMS, "n"],
    )
    for source in sources:
        recs = [summary(results, attack, target, f"transfer_from_{source}") for target in ARMS]
        t.rows.append([source, *(fmt_mean_std(r) for r in recs), str(max((r["n"] for r in recs if r), default=0))])
    return t
