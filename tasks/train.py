"""Stages 2 and 3 tasks: train the baseline and the constrained arm (resume from checkpoints on retry)."""

from prefect import task

from monolm.stages import train
from tasks.common import fault_after_step
from tasks.stage import as_ref as _ref, run_stage


@task(name="train_baseline", task_run_name="train-baseline-seed-{seed}")
def train_baseline_task(cfg: dict, seed: int, setup: dict) -> dict:
    return run_stage("train_baseline", cfg, seed, lambda c: train.run(c, seed, "baseline", _ref(setup), progress=False,
                                                   on_log=fault_after_step("train_baseline")))


@task(name="train_monotonic", task_run_name="train-monotonic-seed-{seed}")
def train_monotonic_task(cfg: dict, seed: int, setup: dict, constrain: dict) -> dict:
    return run_stage("train_monotonic", cfg, seed,
                     lambda c: train.run(c, seed, "monotonic", _ref(setup), _ref(constrain), progress=False,
                                       on_log=fault_after_step("train_monotonic")))
