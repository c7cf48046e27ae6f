"""One Prefect task per per-seed stage (0-6), made from the registry by one factory.

Each task is a thin call of the library's stage function (`monolm.study.registry`) on the results
of its input stages; `stage_task_for` gives the flow a stage's task. A stage added to the
registry gets its task here with nothing to write. Training resumes from checkpoints on retry,
attacks from finished units.
"""

from __future__ import annotations

from prefect import Task, task

from monolm.study.registry import SEED_STAGES, Stage
from tasks.stage import run_seed_stage


def task_run_name(stage: str) -> str:
    """The UI's name of a stage's task run: `train_baseline` -> `train-baseline-seed-{seed}`."""
    return stage.replace("_", "-") + "-seed-{seed}"


def stage_task(spec: Stage) -> Task:
    """The task of per-seed stage `spec`: task name = stage name, task-run name from
    `task_run_name`. Its function carries a qualified name of its own (`<stage>_task`), so every
    stage has its own Prefect task key although all share this code."""

    def run(cfg: dict, seed: int, inputs: dict) -> dict:
        return run_seed_stage(spec.name, cfg, seed, inputs)

    run.__name__ = run.__qualname__ = f"{spec.name}_task"
    run.__doc__ = f"Stage {spec.number}: {spec.label} (`{spec.entry}`)."
    return task(name=spec.name, task_run_name=task_run_name(spec.name))(run)


STAGE_TASKS: dict[str, Task] = {spec.name: stage_task(spec) for spec in SEED_STAGES}


def stage_task_for(spec: Stage) -> Task:
    """The task of `spec`, made on first use for a stage registered after import (`register_attack`)."""
    if spec.name not in STAGE_TASKS:
        STAGE_TASKS[spec.name] = stage_task(spec)
    return STAGE_TASKS[spec.name]
