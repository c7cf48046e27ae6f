"""Verdicts that say only what the data support (issue 23 item 6).

An audit of a demo and a 2×2×2 grid found every number right and several sentences misleading:
a "more robust … significant" on a secondary measure at p = 0.046, one of seven uncorrected
tests; a cell report and its grid report with opposite verdicts; a 1-degree-of-freedom test over 2
seeds read as "no quality cost"; zero-width "95% CIs" from two identical seed values; a success
rate of 0% everywhere filling a headline row. The rules, applied here and by the renderers:

- One primary measure per question: quality = the test loss (across seeds; within a seed, per
  document), robustness = each attack's absolute loss increase. Every other test is secondary:
  reported, never a verdict.
- Holm over the report's family of primary tests: the across-seed tests when there are any,
  else every within-seed primary test of every seed (`p_holm`, `significant_holm`, `holm_m`).
- Fewer than `MIN_SEEDS` seeds: no across-seed test or interval (with 2 seeds the t-test has one
  degree of freedom); the within-seed tests are reported per seed instead.
- A measure that is the same in every arm and seed is said once as such, not as a table row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from monolm import stats
from monolm.report.formatting import fmt_num, fmt_pct
from monolm.report.labels import ATTACKS, METRIC_LABEL

MIN_SEEDS = 3  # an across-seed test or interval needs at least this many seeds


def primary_metrics() -> dict[str, tuple[str, ...]]:
    """{stage: its primary metrics}: the test loss, and each attack's absolute increase."""
    return {"evaluate": ("loss", "doc_loss"), **{attack: ("abs_increase",) for attack in ATTACKS}}


PRIMARY_NOTE = (
    "Primary measures: the test loss for quality and each attack's absolute loss increase for robustness; "
    "verdicts rest on these alone, Holm-corrected over the {m} primary test{s} of this report. Every other "
    "measure (perplexity, relative increase, success rate, transfer) is secondary: reported, not a verdict."
)


def is_primary(comp: dict[str, Any]) -> bool:
    """A constrained − baseline test of a primary measure."""
    return (comp["a"], comp["b"]) == ("monotonic", "baseline") and comp["metric"] in primary_metrics().get(
        comp["stage"], ()
    )


def apply_primary_holm(comparisons: Sequence[dict[str, Any]], alpha: float) -> int:
    """Mark every comparison `role` primary or secondary (in place), and Holm-adjust the family of
    primary tests: the across-seed ones when there are any, else the within-seed ones of every
    seed. A primary within-seed test next to an across-seed family is `supporting`. Returns m."""
    primary = [c for c in comparisons if is_primary(c)]
    family = [c for c in primary if c["scope"] == "seeds"] or primary
    for comp in comparisons:
        comp["role"] = "secondary"
    for comp in primary:
        comp["role"] = "primary" if comp in family else "supporting"
    adjusted = stats.holm([c.get("t_p") for c in family])
    m = sum(p is not None for p in adjusted)
    for comp, p in zip(family, adjusted, strict=True):
        comp.update(p_holm=p, significant_holm=p is not None and p < alpha, holm_m=m)
    return m


def significant(comp: dict[str, Any]) -> bool:
    """The verdict's significance: Holm-corrected for a primary test, never for a secondary one."""
    if comp.get("role") == "primary":
        return bool(comp.get("significant_holm"))
    if comp.get("role") in ("secondary", "supporting"):
        return False
    return bool(comp.get("significant"))


def mde_clause(comp: dict[str, Any]) -> str:
    """ " (detectable: ±0.043)": the smallest difference the test detects with 80% power
    (`monolm.stats_power`), said next to every "no significant difference"."""
    mde = comp.get("mde")
    return f" (detectable with 80% power: ±{mde:.3g})" if mde is not None else ""


def primary_note(comparisons: Sequence[dict[str, Any]]) -> str:
    m = max((c.get("holm_m") or 0 for c in comparisons if c.get("role") == "primary"), default=0)
    return PRIMARY_NOTE.format(m=m, s="s" if m != 1 else "")


def constant_measure(results: dict[str, Any], stage: str, metric: str) -> float | None:
    """The value a measure has in every model and seed, when it is the same everywhere (and
    measured at least twice); None otherwise."""
    values = [r["value"] for r in results["values"] if r["stage"] == stage and r["metric"] == metric]
    if len(values) >= 2 and all(v == values[0] for v in values):
        return values[0]
    return None


def constant_sentence(results: dict[str, Any], stage: str, metric: str, value: float) -> str:
    """The one sentence a constant measure gets instead of a headline row."""
    name = f"{ATTACKS.get(stage, stage)} {METRIC_LABEL.get(metric, metric)}"
    shown = fmt_pct(value) if metric.endswith("_rate") else fmt_num(value)
    text = f"{name}: {shown} in every arm and seed, so it tells the arms apart nowhere and is not a headline row"
    threshold = (results.get("meta") or {}).get("success_threshold")
    if metric == "success_rate" and value == 0 and threshold is not None:
        text += f" (no text's relative loss increase reached the {fmt_pct(threshold)} threshold)"
    return text + "."


def within_seed_verdict(within: Sequence[dict[str, Any]], higher: str, lower: str) -> str:
    """What the within-seed tests show, seed by seed, when there is no across-seed test."""
    if not within:
        return "no test"
    parts = []
    for comp in sorted(within, key=lambda c: c["seed"]):
        if comp.get("mean_diff") is None:
            parts.append(f"seed {comp['seed']}: no data")
        elif significant(comp):
            parts.append(f"seed {comp['seed']}: {higher if comp['mean_diff'] > 0 else lower}")
        else:
            parts.append(f"seed {comp['seed']}: no significant difference{mde_clause(comp)}")
    return "; ".join(parts)


def few_seeds_sentence(n_seeds: int) -> str:
    return (
        f"{n_seeds} seeds: no across-seed test or interval is reported (it needs at least {MIN_SEEDS} seeds; "
        f"with {n_seeds} a paired t-test has {n_seeds - 1} degree{'s' if n_seeds != 2 else ''} of freedom). "
        "Each seed's own tests (over its test documents and attacked texts) are reported per seed instead; "
        "they say nothing about variation between training seeds."
    )
