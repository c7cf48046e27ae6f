"""The cross-variant report's sentences, computed from the numbers of `monolm.report.cross_cell.analysis`: which
variant costs the least quality, which gains the most robustness under each attack, which are
Pareto-optimal, and which differences from the baseline survive the Holm correction. Every name
in a sentence comes from a comparison of measured values; no wording says which variant wins
before the numbers do, and an ordering whose intervals overlap is said not to be established."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from monolm.report.cross_cell.terms import (
    QUALITY,
    family_label,
    family_tests,
    fmt_estimate,
    fmt_interval,
    fmt_params,
    fmt_pvalues,
    fmt_value,
    row_name,
)
from monolm.report.formatting import fmt_p
from monolm.report.labels import ATTACKS

COST = "quality cost (Δ test loss, constrained − baseline, nats/token)"
GAIN = "robustness gain (baseline − constrained absolute loss increase, nats/token; positive: harder to attack)"


def _overlap(a: dict[str, Any], b: dict[str, Any]) -> bool | None:
    """Whether two estimates' intervals overlap; None when either has none."""
    if a.get("ci_low") is None or b.get("ci_low") is None:
        return None
    return a["ci_low"] <= b["ci_high"] and b["ci_low"] <= a["ci_high"]


Ranked = Sequence[tuple[dict[str, Any], dict[str, Any]]]  # (row, estimate), best first


def _order_clause(top: Ranked, rest: Ranked, side: str) -> str:
    """Whether the first of the best rows is set apart from the other rows by its interval."""
    best_row, best = top[0]
    overlapping = [row_name(r) for r, est in rest if _overlap(best, est)]
    unknown = [row_name(r) for r, est in rest if _overlap(best, est) is None]
    if overlapping:
        return (
            f" The interval of {row_name(best_row)} overlaps that of {', '.join(overlapping)}, so these runs "
            "do not establish the order."
        )
    if unknown:
        return f" Without an interval for {', '.join(unknown)}, the order is not tested."
    return f" The interval of {row_name(best_row)} lies entirely {side} every other variant's."


def _named(group: Ranked, extra: Callable[[dict[str, Any]], str]) -> str:
    """ "A, +0.06 (95% CI …)", or for tied rows "A and B (tied), +0.06 (95% CI …)"."""
    names = " and ".join(row_name(row) for row, _ in group) + (" (tied)" if len(group) > 1 else "")
    return f"{names}, {fmt_estimate(group[0][1], sign=True)}{extra(group[0][0])}"


def _ratio(row: dict[str, Any]) -> str:
    ratio = row["quality"]["perplexity_ratio"]
    if not ratio or ratio.get("value") is None:
        return ""
    interval = f" {fmt_interval(ratio)}" if ratio.get("ci_low") is not None else ""
    return f", perplexity ratio {fmt_value(ratio['value'])}{interval}"


def _ranking(
    model: str,
    what: str,
    items: Sequence[tuple[dict[str, Any], dict[str, Any]]],
    *,
    high_first: bool,
    extra: Callable[[dict[str, Any]], str] = lambda row: "",
) -> list[str]:
    """One sentence naming the best and worst rows of a measure (ties named together), with their
    numbers, and whether the intervals set the best apart."""
    ranked = sorted(items, key=lambda item: item[1]["value"], reverse=high_first)
    if not ranked:
        return []
    if len(ranked) == 1:
        return [f"{model}, {what}: {_named(ranked, extra)} (the only variant with this measure)."]
    top = [item for item in ranked if item[1]["value"] == ranked[0][1]["value"]]
    if len(top) == len(ranked):
        return [f"{model}, {what}: the same for all {len(ranked)} variants, {_named(ranked[:1], extra)}."]
    bottom = [item for item in ranked if item[1]["value"] == ranked[-1][1]["value"]]
    best_word, worst_word = ("largest", "smallest") if high_first else ("lowest", "highest")
    clause = _order_clause(top, ranked[len(top) :], "above" if high_first else "below")
    if "lies entirely" not in clause:  # no "best" claim unless the intervals separate the rows
        best_word, worst_word = f"{best_word} point estimate", f"{worst_word} point estimate"
    return [f"{model}, {what}: {best_word} for {_named(top, extra)}; {worst_word} for {_named(bottom, extra)}.{clause}"]


def _quality_ranking(entry: dict[str, Any]) -> list[str]:
    items = [
        (row, row["quality"]["delta_loss"])
        for row in entry["rows"]
        if (row["quality"]["delta_loss"] or {}).get("value") is not None
    ]
    return _ranking(entry["model"], COST, items, high_first=False, extra=_ratio)


def _gain_ranking(entry: dict[str, Any], attack: str) -> list[str]:
    items = [
        (row, row["attacks"][attack]["gain"])
        for row in entry["rows"]
        if attack in row["attacks"] and row["attacks"][attack]["gain"]["value"] is not None
    ]
    out = _ranking(entry["model"], f"{ATTACKS[attack]} {GAIN}", items, high_first=True)
    negative = [row_name(row) for row, est in items if est["value"] < 0]
    if negative:
        out.append(
            f"{entry['model']}, {ATTACKS[attack]}: negative gain (the attack did more damage to the constrained arm "
            f"than to the baseline, by the point estimate) for {', '.join(negative)}."
        )
    return out


def separated(row: dict[str, Any], attack: str) -> bool:
    """Whether a row's intervals set it apart from the unconstrained baseline (zero cost, zero
    gain): its robustness gain interval lies above 0, or its quality cost interval below 0."""
    gain = (row["attacks"].get(attack) or {}).get("gain") or {}
    cost = row["quality"].get("delta_loss") or {}
    return (gain.get("ci_low") is not None and gain["ci_low"] > 0) or (
        cost.get("ci_high") is not None and cost["ci_high"] < 0
    )


def _pareto_sentence(entry: dict[str, Any], attack: str) -> list[str]:
    """Pareto-optimal rows, claimed only where their intervals separate them from the baseline."""
    pareto = entry["pareto"][attack]
    rows = {row["label"]: row for row in entry["rows"]}
    if not pareto["optimal"] and not pareto["dominated"]:
        return []
    claimed = [row_name(rows[label]) for label in pareto["optimal"] if separated(rows[label], attack)]
    unclaimed = [row_name(rows[label]) for label in pareto["optimal"] if not separated(rows[label], attack)]
    dominated = ", ".join(row_name(rows[label]) for label in pareto["dominated"]) or "none"
    text = (
        f"{entry['model']}, {ATTACKS[attack]}: Pareto-optimal (no other variant, nor the unconstrained baseline "
        f"at zero cost and zero gain, has both a lower quality cost and a higher robustness gain), with "
        f"intervals that separate them from the baseline: {', '.join(claimed) or 'none of the variants'}"
    )
    if unclaimed:
        text += (
            f"; on the front by point estimates only, with intervals that include the baseline's zero gain, so "
            f"no Pareto claim is made: {', '.join(unclaimed)}"
        )
    text += f"; dominated (point estimates): {dominated}."
    if not pareto["baseline_optimal"] and any(separated(rows[label], attack) for label in pareto["optimal"]):
        text += (
            " The unconstrained baseline itself is dominated (a variant has Δ loss ≤ 0 and gain ≥ 0, one of them "
            "strictly)."
        )
    return [text]


def _direction(family: str, diff: float) -> str:
    if family == QUALITY:
        return "higher test loss than the baseline" if diff > 0 else "lower test loss than the baseline"
    return "more damage than to the baseline" if diff > 0 else "less damage than to the baseline"


def _holm_sentence(entry: dict[str, Any], family: str, alpha: float) -> list[str]:
    """Which differences from the baseline survive the Holm correction over the model's rows."""
    pairs = [(row, t) for row, t in zip(entry["rows"], family_tests(entry["rows"], family), strict=True) if t]
    tested = [(row, t) for row, t in pairs if t.get("t_p") is not None]
    head = f"{entry['model']}, {family_label(family)} (constrained − baseline, paired t-test)"
    if not tested:
        return [f"{head}: no test could be computed for any variant, so no difference is claimed."] if pairs else []
    m = len(tested)
    over = f"Holm correction over {m} variant{'s' if m != 1 else ''}" + (" (one test: p unchanged)" if m == 1 else "")
    kept = [(row, t) for row, t in tested if t["significant_holm"]]
    lost = [(row, t) for row, t in tested if t["significant"] and not t["significant_holm"]]
    if kept:
        listed = "; ".join(
            f"{row_name(row)}: {_direction(family, t['value'])}, {fmt_estimate(t, sign=True, with_n=False)}, "
            f"{fmt_pvalues(t)}"
            for row, t in kept
        )
        verb = "remains" if len(kept) == 1 else "remain"
        text = f"{head}: after {over}, {len(kept)} of {m} differences {verb} significant at α={alpha:g} ({listed})."
    else:
        row, t = min(tested, key=lambda item: item[1]["p_holm"])
        detectable = (
            f"; with 80% power its test detects a difference of ±{t['mde']:.3g}" if t.get("mde") is not None else ""
        )
        text = (
            f"{head}: after {over}, no difference is significant at α={alpha:g} "
            f"(smallest Holm-adjusted p={fmt_p(t['p_holm'])}, {row_name(row)}{detectable})."
        )
    if lost:
        text += " Significant before the correction only: " + "; ".join(
            f"{row_name(row)} ({fmt_pvalues(t)})" for row, t in lost
        )
        text += "."
    return [text]


def _caveats(entry: dict[str, Any]) -> list[str]:
    """One seed (tests within that seed), and baselines that differ between the variants."""
    out = []
    if all(row["n_seeds"] == 1 for row in entry["rows"]):
        out.append(
            f"{entry['model']}: one seed ({', '.join(str(s) for s in entry['seeds'])}), so every test is within "
            "that seed (over the test documents or the attacked texts) and says nothing about variation between "
            "training seeds."
        )
    if entry["baseline_mismatches"]:
        seeds = sorted({m["seed"] for m in entry["baseline_mismatches"]})
        out.append(
            f"{entry['model']}: the baseline's numbers differ between the variants in seed(s) "
            f"{', '.join(str(s) for s in seeds)}, so those variants were not compared against the same baseline."
        )
    return out


def model_findings(entry: dict[str, Any], alpha: float) -> list[str]:
    """The findings of one model, in reading order: caveats, quality cost, then per attack the
    robustness gain and the Pareto set, then the Holm-corrected tests of every family."""
    out = _caveats(entry) + _quality_ranking(entry)
    for attack in entry["attacks"]:
        out += _gain_ranking(entry, attack) + _pareto_sentence(entry, attack)
    for family in entry["families"]:
        out += _holm_sentence(entry, family, alpha)
    return out


def across_model_findings(across: dict[str, Any] | None) -> list[str]:
    """The robustness gain of each (variant, init) at each model size, smallest model first."""
    if not across:
        return []
    out = []
    for series in across["series"]:
        for attack, points in series["points"].items():
            if len(points) < 2:
                continue
            listed = "; ".join(
                f"{fmt_estimate(p, sign=True)} at {fmt_params(p['parameters'])} parameters ({p['model']})"
                for p in points
            )
            out.append(
                f"{series['variant']} ({series['init']}), {ATTACKS[attack]} robustness gain by model size: {listed}."
            )
    return out
