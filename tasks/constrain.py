"""Stage 1 task: apply the non-negativity constraint and report its effect."""

from prefect import task

from monolm.stages import constrain
from tasks.stage import as_ref as _ref, run_stage


@task(name="constrain", task_run_name="constrain-seed-{seed}")
def constrain_task(cfg: dict, seed: int, setup: dict) -> dict:
    return run_stage("constrain", cfg, seed, lambda c: constrain.run(c, seed, _ref(setup), progress=False))
