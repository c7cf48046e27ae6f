"""What a cell's own report says about its grid: the grid report's Holm-corrected verdict is the
one that counts, repeated in the cell's report.

Why: a cell's report tests its constrained arm against the baseline without knowing the other
variants; the grid report corrects those tests over the variants (Holm). An audit found a cell
report claiming a HotFlip robustness gain at p = 0.030 that its grid report, after Holm
(p = 0.12), rejects: two reports of one run with opposite verdicts. The cell report now opens
with the grid's verdict for that cell.
"""

from __future__ import annotations

from typing import Any

from monolm.report.cross_cell.terms import family_label, family_tests, fmt_estimate, fmt_pvalues
from monolm.report.formatting import fmt_p


def _verdict(test: dict[str, Any] | None, alpha: float) -> str:
    if not test or test.get("t_p") is None:
        return "no test"
    if test.get("significant_holm"):
        return f"significant at α={alpha:g} after Holm"
    if test.get("significant"):
        return f"not significant after Holm (significant at α={alpha:g} before the correction only)"
    return "not significant"


def grid_verdict(grid: dict[str, Any], label: str) -> list[str] | None:
    """The grid report's corrected verdict for the cell `label`, one sentence per measure family;
    None when the grid has no such cell."""
    alpha = grid.get("alpha", 0.05)
    for entry in grid.get("models") or []:
        for row in entry["rows"]:
            if row["label"] != label:
                continue
            m = len(entry["rows"])
            out = []
            for family in entry["families"]:
                (test,) = family_tests([row], family)
                if test is None:
                    continue
                p = fmt_pvalues(test) if test.get("p_holm") is not None else f"p={fmt_p(test.get('t_p'))}"
                out.append(
                    f"{family_label(family)} (constrained − baseline): {fmt_estimate(test, sign=True)}, {p}, "
                    f"Holm over {m} variant{'s' if m != 1 else ''}: {_verdict(test, alpha)}"
                )
            return out
    return None


def grid_verdict_lines(results: dict[str, Any]) -> list[str]:
    """The block a cell report inside a grid opens with (nothing for a one-cell run)."""
    verdict = results.get("grid_verdict")
    if verdict is None:
        return []
    head = (
        "> This cell is part of a grid run. The grid report (`../../../report.md`) corrects this cell's tests "
        "for the other variants (Holm); **its verdict is the one that counts**. The tests below are this "
        "cell's own, corrected only within this report. The grid's verdict for this cell:"
    )
    return [head, ">", *[f"> - {s}." for s in verdict], ""]
