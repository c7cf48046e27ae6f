"""Stages 5 and 6 tasks: UAT and HotFlip on both arms (a retry resumes from finished units)."""

from prefect import task

from monolm.stages import attack
from tasks.stage import as_ref, run_stage


def _trained(train_baseline: dict, train_monotonic: dict) -> dict:
    return {"baseline": as_ref(train_baseline), "monotonic": as_ref(train_monotonic)}


@task(name="uat", task_run_name="uat-seed-{seed}")
def uat_task(cfg: dict, seed: int, setup: dict, train_baseline: dict, train_monotonic: dict) -> dict:
    return run_stage("uat", cfg, seed, lambda c: attack.run_uat(
        c, seed, as_ref(setup), _trained(train_baseline, train_monotonic), progress=False))


@task(name="hotflip", task_run_name="hotflip-seed-{seed}")
def hotflip_task(cfg: dict, seed: int, setup: dict, train_baseline: dict, train_monotonic: dict) -> dict:
    return run_stage("hotflip", cfg, seed, lambda c: attack.run_hotflip(
        c, seed, as_ref(setup), _trained(train_baseline, train_monotonic), progress=False))
