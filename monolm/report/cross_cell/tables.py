"""The cross-variant report's tables, built once as `Table`s for report.md and tables.tex.

Per model: one quality table and one table per attack (never more than 8 columns, so each fits a
page and a browser window). One sign convention throughout, the same as the findings and figures:
quality cost Δ loss = constrained − baseline (positive: worse) and robustness gain = baseline −
constrained absolute loss increase (positive: harder to attack). Each table's note maps every
interval column to the method that computed its 95% CI.
"""

from __future__ import annotations

from typing import Any

from monolm.report.cross_cell.terms import file_slug, fmt_interval, fmt_params, fmt_value, row_name, unit_text
from monolm.report.formatting import fmt_p, fmt_pct
from monolm.report.table_base import Table

SIGN_CONVENTION = (
    "Signs: quality cost Δ loss = constrained − baseline (positive: the constraint made the model worse); "
    "robustness gain = baseline − constrained absolute loss increase (positive: harder to attack)."
)


def _cell(est: dict[str, Any] | None, *, sign: bool = False, pct: bool = False) -> str:
    """ "value [low, high]", with its n when that is not the row's seeds (one seed: texts, documents)."""
    if not est or est.get("value") is None:
        return "—"
    text = fmt_value(est["value"], sign=sign, pct=pct)
    if est.get("ci_low") is not None:
        text += " " + fmt_interval(est, pct=pct)
    if est.get("unit") != "seeds":
        text += f" (n={unit_text(est.get('n'), est['unit'])})"
    return text


def _p_cell(test: dict[str, Any] | None) -> str:
    """ "uncorrected (Holm)"."""
    if not test or test.get("t_p") is None:
        return "—"
    return f"{fmt_p(test['t_p'])} ({fmt_p(test.get('p_holm'))})"


def _ci_note(columns: dict[str, list[dict[str, Any] | None]]) -> str:
    """ "95% CI — <column>: <method>; ..." for every column whose cells carry an interval."""
    parts = []
    for column, ests in columns.items():
        methods = sorted({e["ci_method"] for e in ests if e and e.get("ci_method")})
        if methods:
            parts.append(f"{column}: {', '.join(methods)}")
    return ("95% CI — " + "; ".join(parts) + ".") if parts else "No confidence intervals."


def _p_note(n_rows: int, family: str) -> str:
    return (
        f"p: paired t-test, uncorrected (in parentheses Holm-adjusted over the {n_rows} variant"
        f"{'s' if n_rows != 1 else ''} of this model, {family})."
    )


def _ratio_words(entry: dict[str, Any]) -> str:
    """What exp(Δ loss) is: across seeds the geometric mean of the per-seed perplexity ratios; with one
    seed, Δ loss is the mean per-document difference, so the ratio is over documents."""
    units = {(row["quality"]["delta_loss"] or {}).get("unit") for row in entry["rows"]} - {None}
    words = []
    if "seeds" in units:
        words.append("across seeds: the geometric mean of the per-seed perplexity ratios")
    if "documents" in units:
        words.append(
            "with one seed: from the mean per-document loss difference, which weighs documents equally and can "
            "differ slightly from the ratio of the token-weighted perplexities in the cell's report"
        )
    return "; ".join(words) or "no test"


def _size(entry: dict[str, Any]) -> str:
    return f" ({fmt_params(entry['parameters'])} parameters)" if entry["parameters"] is not None else ""


def quality_table(entry: dict[str, Any]) -> Table:
    """One model's quality cost: a row per (variant, init)."""
    rows = entry["rows"]
    t = Table(
        f"grid-{file_slug(entry['model'])}-quality",
        f"{entry['model']}{_size(entry)}: quality cost of each constraint variant against the baseline",
        ["Variant (init)", "n", "Perplexity ratio", "Δ loss (nats/token)", "p (Holm)"],
    )
    t.rows = [
        [
            row_name(row),
            unit_text(row["n_seeds"], "seeds"),
            _cell(row["quality"]["perplexity_ratio"]),
            _cell(row["quality"]["delta_loss"], sign=True),
            _p_cell(row["quality"]["delta_loss"]),
        ]
        for row in rows
    ]
    ref = entry["baseline"]["perplexity"]
    t.note = " ".join(
        s
        for s in (
            f"Perplexity ratio: constrained / baseline test perplexity, exp(Δ loss) ({_ratio_words(entry)}). "
            "Δ loss: constrained − baseline test loss in nats/token (positive: worse). Cells: value [95% CI].",
            _ci_note({"Δ loss": [r["quality"]["delta_loss"] for r in rows]}),
            _p_note(len(rows), "the Δ loss family"),
            f"Baseline (shared by every variant of a seed): test perplexity {_cell(ref)}." if ref else "",
        )
        if s
    )
    return t


def attack_table(grid: dict[str, Any], entry: dict[str, Any], attack: str) -> Table:
    """One model's robustness under one attack: a row per (variant, init)."""
    name = grid["attacks"][attack]
    threshold = grid.get("success_threshold")
    success = f"Success rate (rel. > {fmt_pct(threshold)})" if threshold is not None else "Success rate"
    rows = entry["rows"]
    t = Table(
        f"grid-{file_slug(entry['model'])}-{file_slug(attack)}",
        f"{entry['model']}{_size(entry)}: robustness of each constraint variant under {name}",
        ["Variant (init)", "n", "Loss increase, constrained", success, "Robustness gain", "p (Holm)", "Pareto-optimal"],
    )
    blocks = [row["attacks"].get(attack) or {} for row in rows]
    t.rows = [
        [
            row_name(row),
            unit_text(row["n_seeds"], "seeds"),
            _cell(block.get("constrained_abs_increase")),
            _cell(block.get("constrained_success_rate"), pct=True),
            _cell(block.get("gain"), sign=True),
            _p_cell(block.get("difference")),
            "yes" if row["pareto"].get(attack) else "—",
        ]
        for row, block in zip(rows, blocks, strict=True)
    ]
    ref = entry["baseline"]["attacks"].get(attack)
    t.note = " ".join(
        s
        for s in (
            f"Loss increase: the constrained arm's absolute loss increase under {name} (nats/token). Robustness "
            "gain: baseline − constrained absolute loss increase (nats/token; positive: harder to attack), the "
            "paired test's difference with its sign and interval mirrored. Cells: value [95% CI].",
            _ci_note(
                {
                    "loss increase": [b.get("constrained_abs_increase") for b in blocks],
                    "success rate": [b.get("constrained_success_rate") for b in blocks],
                    "robustness gain": [b.get("gain") for b in blocks],
                }
            ),
            _p_note(len(rows), f"the {name} family; the test of the paired difference"),
            (
                f"Baseline: {name} loss increase {_cell(ref['abs_increase'])}, success rate "
                f"{_cell(ref['success_rate'], pct=True)}."
            )
            if ref
            else "",
            "Pareto-optimal: no other variant, nor the baseline at zero cost and zero gain, has both a lower Δ "
            "loss and a higher robustness gain (point estimates).",
        )
        if s
    )
    return t


def model_tables(grid: dict[str, Any], entry: dict[str, Any]) -> list[Table]:
    """A model's quality table, then one table per attack."""
    return [quality_table(entry), *(attack_table(grid, entry, a) for a in entry["attacks"])]


def grid_tables(grid: dict[str, Any]) -> list[Table]:
    return [t for entry in grid["models"] for t in model_tables(grid, entry)]
