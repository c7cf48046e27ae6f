"""Stage 7's entry: a study of one cell writes that cell's results folder (as before the grid,
under the cell's config); a study of several cells writes the cross-cell report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from monolm.config import ExperimentConfig
from monolm.report import stage as one_cell
from monolm.report.cross_cell import stage as cross_cell
from monolm.study.cells import cells
from monolm.study.frame import StageRef

SeedRefs = Mapping[str, StageRef | Mapping[str, Any]]


def aggregate(cfg: ExperimentConfig, per_cell: Mapping[str, Sequence[SeedRefs]]) -> dict[str, Any]:
    """Aggregate a study. `per_cell`: {cell label: one {stage name: StageRef} per seed}."""
    if len(per_cell) == 1:
        (label, seeds), cell = next(iter(per_cell.items())), cells(cfg)[0]
        if cell.label != label:
            raise ValueError(f"results of cell {label}, but the study's one cell is {cell.label}")
        return one_cell.run(cell.cfg, seeds)
    return cross_cell.run_grid(cfg, per_cell)
