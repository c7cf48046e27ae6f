"""The report's first screen: one row per headline measure (baseline, constrained, their
difference with its CI and p, a verdict and n), and the caveats those tests share, said once
under the table instead of in every finding."""

from __future__ import annotations

from typing import Any

from monolm.report.damage_arm import damage_mean, damage_note, damage_rows, has_damage
from monolm.report.effect_tables import wilcoxon_floor_note
from monolm.report.formatting import fmt_num, fmt_p, fmt_pct
from monolm.report.labels import ATTACKS, METRIC_LABEL
from monolm.report.robust_section import HEADLINE_NOTE, headline_rows
from monolm.report.summaries import ALPHA, summary
from monolm.report.table_base import Table
from monolm.report.verdicts import (
    MIN_SEEDS,
    constant_measure,
    constant_sentence,
    few_seeds_sentence,
    mde_clause,
    primary_note,
    significant,
    within_seed_verdict,
)


# Quality first, then for every attack the primary effect, then (secondary) its success rate.
def measures() -> tuple[tuple[str, str], ...]:
    return (
        ("evaluate", "loss"),
        *((attack, "abs_increase") for attack in ATTACKS),
        *((attack, "success_rate") for attack in ATTACKS),
    )


WITHIN_SEED_CAVEAT = (
    "Rows tested within one seed (over the attacked texts or the test documents of that seed) compare "
    "one trained pair of models: they say nothing about variation between training seeds."
)


def primary_test(results: dict[str, Any], stage: str, metric: str) -> dict[str, Any] | None:
    """The test a headline row reports: across seeds when there is one; otherwise the one
    within-seed test of the measure (for quality: the per-document loss); None when there is no
    test or several within-seed tests (the findings list those)."""
    comps = results["comparisons"]
    across = [c for c in comps if c["stage"] == stage and c["metric"] == metric and c["scope"] == "seeds"]
    if across:
        return across[0]
    within_metric = "doc_loss" if stage == "evaluate" else metric
    within = [c for c in comps if c["stage"] == stage and c["metric"] == within_metric and c["scope"] != "seeds"]
    return within[0] if len(within) == 1 else None


def _words(stage: str) -> tuple[str, str]:
    """(verdict when the constrained arm's value is higher, when lower)."""
    if stage == "evaluate":
        return "constrained worse", "constrained better"
    return "constrained less robust", "constrained more robust"


def verdict(stage: str, comp: dict[str, Any] | None) -> str:
    """The row's verdict in words, from the sign of the difference and the test's significance
    (Holm-corrected for a primary test; a secondary test gives none)."""
    if comp is None or comp.get("mean_diff") is None:
        return "no test"
    if comp.get("role") == "secondary":
        return "secondary: no verdict"
    if not significant(comp):
        return "no significant difference" + (" after Holm" if comp.get("significant") else "") + mde_clause(comp)
    higher, lower = _words(stage)
    return higher if comp["mean_diff"] > 0 else lower


def _within(results: dict[str, Any], stage: str, metric: str) -> list[dict[str, Any]]:
    within_metric = "doc_loss" if stage == "evaluate" else metric
    return [
        c
        for c in results["comparisons"]
        if c["stage"] == stage and c["metric"] == within_metric and c["scope"] != "seeds" and c["b"] == "baseline"
    ]


def _label(stage: str, metric: str, comp: dict[str, Any] | None) -> str:
    if comp is not None and comp["metric"] == "doc_loss":
        return f"Test loss per document (nats/token), seed {comp['seed']}"
    if stage == "evaluate":
        return "Test loss (nats/token)"
    return f"{ATTACKS[stage]} {METRIC_LABEL[metric]}" + (" (secondary)" if metric == "success_rate" else "")


def _n(comp: dict[str, Any] | None, fallback: int | None) -> str:
    if comp is None:
        return f"{fallback} seed{'s' if fallback != 1 else ''}" if fallback else "—"
    where = "" if comp["scope"] == "seeds" else f" (seed {comp['seed']})"
    return f"{comp['n']} {comp['scope']}{where}"


def headline_row(results: dict[str, Any], stage: str, metric: str) -> list[str] | None:
    """One row, or None when neither arm has the measure."""
    base, mono = summary(results, stage, "baseline", metric), summary(results, stage, "monotonic", metric)
    if base is None and mono is None:
        return None
    comp = primary_test(results, stage, metric)
    fmt = fmt_pct if metric == "success_rate" else fmt_num
    within = _within(results, stage, metric) if comp is None else []
    if comp is not None and comp.get("mean_b") is not None:  # the values the difference is of
        b, m = comp["mean_b"], comp["mean_a"]
    else:
        b, m = (base or {}).get("mean"), (mono or {}).get("mean")
    diff, ci, p = "—", "—", "—"
    if comp is not None and comp.get("mean_diff") is not None:
        diff = fmt(comp["mean_diff"]) if metric == "success_rate" else fmt_num(comp["mean_diff"], sign=True)
        if comp.get("ci_low") is not None:
            ci = f"[{fmt(comp['ci_low'])}, {fmt(comp['ci_high'])}]"
        p = fmt_p(comp.get("t_p"))
        if comp.get("p_holm") is not None:
            p = f"{fmt_p(comp['p_holm'])} (uncorrected {p})"
    n_seeds = max((r["n"] for r in (base, mono) if r), default=None)
    words = within_seed_verdict(within, *_words(stage)) if within else verdict(stage, comp)
    return [_label(stage, metric, comp), fmt(b), fmt(m), diff, ci, p, words, _n(comp, n_seeds)]


def headline_table(results: dict[str, Any]) -> Table | None:
    """The first table of the report; its note holds the caveats the rows share, once."""
    t = Table(
        "headline",
        "Headline: the constrained arm against the baseline",
        ["Measure", "Baseline", "Constrained", "Difference", "95% CI", "p (paired t, Holm)", "Verdict", "n"],
    )
    constant = {(s, m): v for s, m in measures() if (v := constant_measure(results, s, m)) is not None}
    shown = [(s, m) for s, m in measures() if (s, m) not in constant]
    t.rows = [row for stage, metric in shown if (row := headline_row(results, stage, metric))]
    if not t.rows:
        return None
    if has_damage(results):  # the damage-matched arm's column, and its paired tests as rows
        t.columns.insert(3, "Damage-matched")
        for row, (stage, metric) in zip(t.rows, [m for m in shown if headline_row(results, *m)], strict=True):
            row.insert(3, (fmt_pct if metric == "success_rate" else fmt_num)(damage_mean(results, stage, metric)))
        t.rows += damage_rows(results, shown)
    # Quality-matched rows ("Robust or damaged?"): the ladder's prediction stands in the baseline's column.
    pad = ["—"] * (len(t.columns) - 8)  # the damage-matched column, when there is one
    matched = [row[:3] + pad + row[3:] for row in headline_rows(results.get("robust_or_damaged"))]
    t.rows += matched
    tests = [primary_test(results, stage, metric) for stage, metric in shown]
    caveats = [
        "Difference: constrained − baseline, with the 95% CI and p of a paired t-test "
        f"(α = {ALPHA}; for a primary measure the Holm-adjusted p first); the Findings give the Wilcoxon test too.",
        primary_note(results["comparisons"]),
    ]
    n_seeds = len((results.get("meta") or {}).get("seeds") or [])
    if 1 < n_seeds < MIN_SEEDS:
        caveats.append(few_seeds_sentence(n_seeds))
    caveats += [constant_sentence(results, s, m, v) for (s, m), v in constant.items()]
    if has_damage(results):
        caveats.append(damage_note(results))
    if matched:
        caveats.append(HEADLINE_NOTE)
    if any(c is not None and c["scope"] != "seeds" for c in tests):
        caveats.append(WITHIN_SEED_CAVEAT)
    floor = wilcoxon_floor_note([c for c in tests if c is not None]).strip()
    if floor:
        caveats.append(floor)
    t.note = " ".join(caveats)
    return t
