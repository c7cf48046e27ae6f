"""What a study would execute, before it runs (`monolm run --dry-run`): every stage execution the
grid implies, once for a model's shared stages, and which of them are finished already (a valid
manifest from the same config, inputs and code: what the run would reuse)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from monolm.config import ExperimentConfig
from monolm.study.cells import cells, model_names
from monolm.study.frame import StageRef, existing
from monolm.study.layout import cell_paths
from monolm.study.registry import SEED_STAGES


@dataclass(frozen=True)
class Execution:
    """One stage of one seed of one cell (or of a model's shared folder)."""

    where: str  # `<model>/shared` or the cell's label
    seed: int
    stage: str
    done: bool


def plan_study(cfg: ExperimentConfig, last: int = SEED_STAGES[-1].number) -> list[Execution]:
    """Every stage execution of stages 0..`last` of the study, in run order; a stage is `done`
    when its finished result would be reused (so, are all of its inputs)."""
    plan: list[Execution] = []
    seen: set[tuple[str, int, str]] = set()
    for cell in cells(cfg):
        for seed in cfg.seeds:
            paths = cell_paths(cell.cfg, seed)
            refs: dict[str, StageRef | None] = {}
            for spec in SEED_STAGES:
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


def format_plan(cfg: ExperimentConfig, plan: list[Execution]) -> str:
    """The grid, then per stage how many executions it implies and how many are done."""
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
    for spec in SEED_STAGES:
        if spec.name in total:
            n, d = total[spec.name], done[spec.name]
            lines.append(f"{spec.name:<20}{n:>11}{d:>6}{n - d:>8}")
    n_done = sum(done.values())
    lines.append(f"{'aggregate':<20}{1:>11}{'':>6}{'(always)':>8}")
    lines.append(
        f"total: {len(plan) + 1} stage executions, {n_done} done already (reused), {len(plan) - n_done + 1} to run; "
        "a model's shared stages (setup, train_baseline, the baseline's evaluation and attacks, and the quality "
        "ladder) count once per seed"
    )
    return "\n".join(lines)
