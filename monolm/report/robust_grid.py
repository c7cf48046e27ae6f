"""Effective robustness across a grid: each cell's constrained arm against its model's quality
ladder (`monolm.report.robust_section`, one per cell's results), with Holm's correction over the
(variant, init) cells of one model, per attack (the cells share their ladder and baseline, so the
tests are not independent; Holm holds under any dependence). The verdict follows the corrected p."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from monolm import stats
from monolm.report.labels import ATTACKS
from monolm.report.robustness import EQUAL, LESS, MORE, OUTSIDE
from monolm.report.summaries import ALPHA

ARM = "monotonic"


def _corrected_verdict(row: dict[str, Any], alpha: float) -> str:
    if not row["in_range"]:
        return OUTSIDE
    if row["p_holm"] is None or row["p_holm"] >= alpha:
        return EQUAL
    return MORE if row["effective"] < 0 else LESS


def grid_effective(cells: Sequence[dict[str, Any]], alpha: float = ALPHA) -> dict[str, Any] | None:
    """{model: {attack: [row per cell]}}: each row the cell's effective robustness, CI, bootstrap p,
    Holm-adjusted p over the model's cells (those inside the ladder's range) and the verdict."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for cell in cells:
        section = cell["results"].get("robust_or_damaged") or {}
        for attack, rec in (section.get("attacks") or {}).items():
            arm = rec["arms"].get(ARM)
            if arm is None:
                continue
            row = {"variant": cell["variant"], "init": cell["init"], **arm}
            out.setdefault(cell["model"], {}).setdefault(attack, []).append(row)
    for attacks in out.values():
        for rows in attacks.values():
            adjusted = stats.holm([r["p_value"] if r["in_range"] else None for r in rows])
            for row, p in zip(rows, adjusted, strict=True):
                row["p_holm"] = p
                row["holm_m"] = sum(r["in_range"] for r in rows)
                row["verdict_holm"] = _corrected_verdict(row, alpha)
    return out or None


def grid_section_lines(section: dict[str, Any] | None) -> list[str]:
    """The grid report's "Robust or damaged?" section: a table per model."""
    if not section:
        return []
    lines = [
        "## Robust or damaged?",
        "",
        "Effective robustness of each cell's constrained arm: its loss increase minus what its model's quality "
        "ladder predicts at its clean loss (nats/token; negative: more robust than its quality predicts), 95% "
        "bootstrap CI, and the bootstrap p Holm-corrected over the model's variants and inits per attack; the "
        "verdict follows the corrected p. Each cell's report shows the figure.",
        "",
    ]
    for model, attacks in section.items():
        lines += [
            f"**{model}**",
            "",
            "| attack | variant | init | effective robustness [95% CI] | p | p (Holm) | verdict |",
            "|---|---|---|---:|---:|---:|---|",
        ]
        for attack, rows in attacks.items():
            for r in rows:
                ci = f"{r['effective']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
                holm = "–" if r["p_holm"] is None else f"{r['p_holm']:.3g}"
                lines.append(
                    f"| {ATTACKS.get(attack, attack)} | {r['variant']} | {r['init']} | {ci} | {r['p_value']:.3g} | "
                    f"{holm} | {r['verdict_holm']} |"
                )
        lines.append("")
    return lines
