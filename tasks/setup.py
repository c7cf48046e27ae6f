"""Stage 0 task: fetch/build the base model and the data splits."""

from prefect import task

from monolm.stages import setup
from tasks.stage import run_stage


@task(name="setup", task_run_name="setup-seed-{seed}")
def setup_task(cfg: dict, seed: int) -> dict:
    return run_stage("setup", cfg, seed, lambda c: setup.run(c, seed, progress=False))
