"""Stage 7 of a grid (several models, constraint variants or inits): each cell aggregated over its
seeds as a one-cell run is (its own folder under `cells/<model>/<variant>-<init>/`), then the
cross-variant report over the cells at the top of the results folder.

    results/<run>/report.md, tables.tex, summary.csv, grid.json, tradeoff-<model>.png, size.png
    results/<run>/cells/<model>/<variant>-<init>/   results.json, report.md, ... of one cell
    results/<run>/config.yaml, manifest.json

All or nothing, as for one cell: the whole folder is built beside its place and renamed into
place with the store rows of every cell recorded in one transaction (`aggregate.publish`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monolm import report
from monolm.config import ExperimentConfig, config_to_yaml
from monolm.core.artifacts import atomic_write_json, atomic_write_text
from monolm.report.answer import answer_sentence
from monolm.report.cross_cell.cell_verdict import grid_verdict
from monolm.report.cross_cell.figures import render_grid_plots
from monolm.report.robust_grid import grid_effective
from monolm.report.stage import (
    _write_folder,
    cell_tags,
    finish,
    publish,
    read_seed,
    results_folder,
    run_id_for,
    run_meta,
    run_row_of,
    store_rows,
)
from monolm.study.cells import Cell, cells
from monolm.study.frame import StageRef

log = logging.getLogger("monolm.stages")
CELLS = "cells"  # the folder of the cells' own results

SeedRefs = Sequence[Mapping[str, StageRef | Mapping[str, Any]]]


def run_grid(cfg: ExperimentConfig, per_cell: Mapping[str, SeedRefs]) -> dict[str, Any]:
    """Aggregate a grid run: `per_cell` maps a cell's label (`<model>/<variant>-<init>`) to one
    {stage name: StageRef} per seed. Returns what `aggregate.run` returns, for the whole grid
    ("table": one row per model's base and baseline and per cell's constrained arm)."""
    started = time.time()
    if not per_cell:
        raise ValueError("aggregate needs at least one cell's stage results")
    run_name, final = results_folder(cfg)
    analysed = [_analyse_cell(cell, per_cell[cell.label], run_name, final, cfg) for cell in _cells_given(cfg, per_cell)]
    grid = _grid(cfg, per_cell, run_name, analysed)
    meta = grid["meta"]
    outcome = _publish_grid(cfg, final, started, grid, analysed)
    shown = {
        "table": console_rows(analysed),
        # Each cell's answer in one sentence (its own report opens with it), one line per cell.
        "answer": "\n".join(f"{cell.label}: {answer_sentence(results)}" for cell, _, results, _ in analysed),
        "metrics": {"cells": meta["cells"], "status": meta["status"]},
    }
    return finish(cfg, meta, final, outcome, f"{len(analysed)} cell(s)", shown)


def _grid(cfg: ExperimentConfig, per_cell: Mapping[str, SeedRefs], run_name: str, analysed: list) -> dict[str, Any]:
    """The cross-cell analysis with its `meta` (the run; complete only when every cell of the grid
    is, with every seed) and the quality-matched robustness of every cell."""
    grid = report.grid_analysis(
        [
            {"model": cell.model, "parameters": parameters, "variant": cell.variant, "init": cell.init, "results": r}
            for cell, _, r, parameters in analysed
        ]
    )
    missing = [c.label for c in cells(cfg) if c.label not in per_cell]
    status = (
        "completed" if not missing and all(r["meta"]["status"] == "completed" for _, _, r, _ in analysed) else "partial"
    )
    grid["meta"] = {
        **analysed[0][2]["meta"],
        "run_id": run_id_for(cfg, run_name),
        "status": status,
        "config_digest": cfg.digest(),
        "cells": [c.label for c, _, _, _ in analysed],
        "missing_cells": missing,
    }
    grid["robust_or_damaged"] = grid_effective(
        [{"model": c.model, "variant": c.variant, "init": c.init, "results": r} for c, _, r, _ in analysed]
    )
    return grid


def _publish_grid(
    cfg: ExperimentConfig, final: Path, started: float, grid: dict[str, Any], analysed: list
) -> tuple[list[str], str, int]:
    """The grid's results folder (each cell's own under `cells/`, the cross-cell report on top)
    and every cell's store rows, all or nothing (`publish`)."""

    def write_files(tmp: Path) -> list[str]:
        files = []
        for cell, data, results, _ in analysed:
            results["grid_verdict"] = grid_verdict(grid, cell.label)  # the corrected verdict that counts
            histories = {d["seed"]: d["histories"] for d in data}
            folder = Path(CELLS, cell.label)
            written = _write_folder(tmp / folder, cell.cfg, results, histories, final / folder / "config.yaml")
            files += [str(folder / rel) for rel in written]
        return files + _write_grid_files(tmp, cfg, grid, [c for c, _, _, _ in analysed])

    meta = grid["meta"]
    return publish(
        cfg,
        final,
        started,
        write_files=write_files,
        inputs={
            f"{cell.label}/seed-{d['seed']}/{name}": st["digest"]
            for cell, data, _, _ in analysed
            for d in data
            for name, st in d["stages"].items()
        },
        metrics={"cells": [c.label for c, _, _, _ in analysed], "status": meta["status"]},
        run=run_row_of(
            cfg,
            meta,
            model="+".join(dict.fromkeys(c.model for c, _, _, _ in analysed)),
            variant="+".join(dict.fromkeys(c.variant for c, _, _, _ in analysed)),
        ),
        rows=[row for cell, _, results, _ in analysed for row in store_rows(results, cell_tags(cell.cfg))],
        digest_of="grid.json",
    )


def _cells_given(cfg: ExperimentConfig, per_cell: Mapping[str, SeedRefs]) -> list[Cell]:
    """The grid's cells that have results, in the grid's order; an unknown label is refused."""
    known = {cell.label: cell for cell in cells(cfg)}
    unknown = sorted(set(per_cell) - set(known))
    if unknown:
        raise ValueError(
            f"results of cell(s) {', '.join(unknown)} that the grid does not have; its cells: {', '.join(known)}"
        )
    return [cell for label, cell in known.items() if label in per_cell]


def _analyse_cell(cell: Cell, seeds: SeedRefs, run_name: str, final: Path, cfg: ExperimentConfig):
    """(cell, seed data, results, model parameters) of one cell, its meta naming the grid run."""
    data = [read_seed(refs) for refs in seeds]
    seed_ids = [d["seed"] for d in data]
    if len(set(seed_ids)) != len(seed_ids):
        raise ValueError(f"cell {cell.label}: seed(s) passed more than once: {sorted(seed_ids)}")
    meta = run_meta(cell.cfg, data, run_name, final / CELLS / cell.label)
    meta.update(run_id=run_id_for(cfg, run_name), cell=cell.label)
    return cell, data, report.analyze(data, meta), _parameters(data)


def _parameters(data: list[dict[str, Any]]) -> int | None:
    """The model's parameter count, from its saved config (a weightless copy: no memory)."""
    for d in data:
        setup = d["stages"].get("setup")
        model_dir = (setup or {}).get("metrics", {}).get("model_dir")
        if model_dir and (Path(model_dir) / "config.json").is_file():
            from monolm.models.shape import shape_of_dir

            return shape_of_dir(model_dir).parameters
    return None


def _write_grid_files(tmp: Path, cfg: ExperimentConfig, grid: dict[str, Any], analysed: list[Cell]) -> list[str]:
    """The cross-variant report at the top of the results folder; returns the relative names."""
    figures = render_grid_plots(grid, tmp)
    rel_plots = {name: path.name for name, path in figures.items()}
    cell_reports = {cell.label: f"{CELLS}/{cell.label}/report.md" for cell in analysed}
    written = {
        "config.yaml": atomic_write_text(tmp / "config.yaml", config_to_yaml(cfg)),
        "grid.json": atomic_write_json(tmp / "grid.json", grid),
        "report.md": atomic_write_text(
            tmp / "report.md", report.grid_markdown(grid, plots=rel_plots, cell_reports=cell_reports)
        ),
        "tables.tex": atomic_write_text(tmp / "tables.tex", report.grid_latex(grid)),
        "summary.csv": atomic_write_text(tmp / "summary.csv", report.grid_csv(grid)),
    }
    return [*written, *sorted(rel_plots.values())]


def console_rows(analysed) -> list[dict[str, Any]]:
    """For the terminal: each model's base and baseline once, then each cell's constrained arm."""
    rows, seen = [], set()
    for cell, _, results, _ in analysed:
        for row in report.console_rows(results):
            if row["arm"] == "monotonic":
                rows.append({"model": cell.model, "constraint": f"{cell.variant}-{cell.init}", **row})
            elif (cell.model, row["arm"]) not in seen:
                seen.add((cell.model, row["arm"]))
                rows.append({"model": cell.model, "constraint": "none (shared)", **row})
    return rows
