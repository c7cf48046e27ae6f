"""What a study would execute, before it runs (`monolm run --dry-run`): every stage execution the
grid implies, once for a model's shared stages, and which of them are finished already (a valid
manifest from the same config, inputs and code: what the run would reuse)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from monolm.config import ExperimentConfig
from monolm.study import registry
from monolm.study.cells import cells, model_names
from monolm.study.frame import StageRef, existing
from monolm.study.layout import cell_paths


@dataclass(frozen=True)
class Execution:
    """One stage of one seed of one cell (or of a model's shared folder)."""

    where: str  # `<model>/shared` or the cell's label
    seed: int
    stage: str
    done: bool


def plan_study(cfg: ExperimentConfig, last: int | None = None) -> list[Execution]:
    """Every stage execution of stages 0..`last` of the study, in run order; a stage is `done`
    when its finished result would be reused (so, are all of its inputs)."""
    last = registry.last_seed_stage() if last is None else last
    plan: list[Execution] = []
    seen: set[tuple[str, int, str]] = set()
    for cell in cells(cfg):
        for seed in cfg.seeds:
            paths = cell_paths(cell.cfg, seed)
            refs: dict[str, StageRef | None] = {}
            for spec in registry.seed_stages():
                if spec.number > last:
                    break
                inputs = {name: refs.get(name) for name in spec.inputs}
                ref = None
                if all(inputs.values()):
                    ref = existing(cell.cfg, paths, spec.name, inputs)
                refs[spec.name] = ref
                where = f"{cell.model}/shared" if spec.scope == "model" else cell.label
                if (where, seed, spec.name) not in seen:
                    seen.add((where, seed, spec.name))
                    plan.append(Execution(where, seed, spec.name, ref is not None))
    return plan


def results_folder(cfg: ExperimentConfig) -> Path:
    """The folder stage 7 writes: `<paths.results_root>/<run name>` (the default name when unset)."""
    return Path(cfg.paths.results_root).resolve() / (cfg.run_name or cfg.default_run_name)


def format_plan(cfg: ExperimentConfig, plan: list[Execution], *, aggregate: bool = True) -> str:
    """The grid, then per stage how many executions it implies and how many are done, then the
    results folder stage 7 writes and whether it exists (`aggregate` False: a `--no-prefect` run,
    which stops before stage 7 and writes no results folder)."""
    study = cells(cfg)
    variants = sorted({c.variant for c in study}, key=[c.variant for c in study].index)
    inits = sorted({c.init for c in study}, key=[c.init for c in study].index)
    lines = [
        f"grid: {len(model_names(cfg))} model(s) {model_names(cfg)} x {len(variants)} variant(s) {variants} "
        f"x {len(inits)} init(s) {inits} x {len(cfg.seeds)} seed(s) {list(cfg.seeds)} = {len(study)} cell(s), "
        f"{len(study) * len(cfg.seeds)} cell-seed(s)",
        f"{'stage':<20}{'executions':>11}{'done':>6}{'to run':>8}",
    ]
    total, done = Counter(e.stage for e in plan), Counter(e.stage for e in plan if e.done)
    for spec in registry.seed_stages():
        if spec.name in total:
            n, d = total[spec.name], done[spec.name]
            lines.append(f"{spec.name:<20}{n:>11}{d:>6}{n - d:>8}")
    n_done, extra = sum(done.values()), int(aggregate)
    if aggregate:
        lines.append(f"{'aggregate':<20}{1:>11}{'':>6}{'(always)':>8}")
    lines.append(
        f"total: {len(plan) + extra} stage executions, {n_done} done already (reused), "
        f"{len(plan) - n_done + extra} to run; a model's shared stages (setup, train_baseline, the baseline's "
        "evaluation and attacks, and the quality ladder) count once per seed"
    )
    if aggregate:
        folder = results_folder(cfg)
        state = (
            "exists already: stage 7 replaces it when it holds this configuration's results, else keeps "
            f"those as {folder.name}-<their digest>"
            if folder.exists()
            else "does not exist yet"
        )
        lines.append(f"results folder: {folder} ({state})")
    else:
        lines.append("results folder: none (--no-prefect stops before stage 7: no report is written)")
    return "\n".join(lines)
