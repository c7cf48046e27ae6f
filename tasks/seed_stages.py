"""One Prefect task per per-seed stage (0-6). Each is a thin call of the library's stage function
(`monolm.study.registry`) on the results of its input stages; `STAGE_TASKS` maps stage names to
tasks for the flow. Training resumes from checkpoints on retry, attacks from finished units."""

from __future__ import annotations

from prefect import Task, task

from monolm.study.registry import SEED_STAGE_NAMES
from tasks.stage import run_seed_stage


@task(name="setup", task_run_name="setup-seed-{seed}")
def setup_task(cfg: dict, seed: int, inputs: dict) -> dict:
    """Stage 0: fetch or build the base model, cut and verify the data splits."""
    return run_seed_stage("setup", cfg, seed, inputs)


@task(name="constrain", task_run_name="constrain-seed-{seed}")
def constrain_task(cfg: dict, seed: int, inputs: dict) -> dict:
    """Stage 1: apply the non-negativity constraint and report its effect."""
    return run_seed_stage("constrain", cfg, seed, inputs)


@task(name="train_baseline", task_run_name="train-baseline-seed-{seed}")
def train_baseline_task(cfg: dict, seed: int, inputs: dict) -> dict:
    """Stage 2: train the baseline arm."""
    return run_seed_stage("train_baseline", cfg, seed, inputs)


@task(name="train_monotonic", task_run_name="train-monotonic-seed-{seed}")
def train_monotonic_task(cfg: dict, seed: int, inputs: dict) -> dict:
    """Stage 3: train the constrained arm."""
    return run_seed_stage("train_monotonic", cfg, seed, inputs)


@task(name="evaluate", task_run_name="evaluate-seed-{seed}")
def evaluate_task(cfg: dict, seed: int, inputs: dict) -> dict:
    """Stage 4 of a cell: the constrained arm's perplexity, with the base model's and the baseline's."""
    return run_seed_stage("evaluate", cfg, seed, inputs)


@task(name="evaluate_baseline", task_run_name="evaluate-baseline-seed-{seed}")
def evaluate_baseline_task(cfg: dict, seed: int, inputs: dict) -> dict:
    """Stage 4's share shared by every cell of a model: the base model and the baseline."""
    return run_seed_stage("evaluate_baseline", cfg, seed, inputs)


@task(name="uat_baseline", task_run_name="uat-baseline-seed-{seed}")
def uat_baseline_task(cfg: dict, seed: int, inputs: dict) -> dict:
    """Stage 5's share shared by every cell of a model: UAT against the baseline."""
    return run_seed_stage("uat_baseline", cfg, seed, inputs)


@task(name="hotflip_baseline", task_run_name="hotflip-baseline-seed-{seed}")
def hotflip_baseline_task(cfg: dict, seed: int, inputs: dict) -> dict:
    """Stage 6's share shared by every cell of a model: HotFlip against the baseline."""
    return run_seed_stage("hotflip_baseline", cfg, seed, inputs)


@task(name="uat", task_run_name="uat-seed-{seed}")
def uat_task(cfg: dict, seed: int, inputs: dict) -> dict:
    """Stage 5 of a cell: UAT against the constrained arm, and transfer between the arms."""
    return run_seed_stage("uat", cfg, seed, inputs)


@task(name="hotflip", task_run_name="hotflip-seed-{seed}")
def hotflip_task(cfg: dict, seed: int, inputs: dict) -> dict:
    """Stage 6 of a cell: HotFlip against the constrained arm, and transfer between the arms."""
    return run_seed_stage("hotflip", cfg, seed, inputs)


@task(name="gcg_baseline", task_run_name="gcg-baseline-seed-{seed}")
def gcg_baseline_task(cfg: dict, seed: int, inputs: dict) -> dict:
    """GCG's share shared by every cell of a model: GCG and its random control against the baseline."""
    return run_seed_stage("gcg_baseline", cfg, seed, inputs)


@task(name="gcg", task_run_name="gcg-seed-{seed}")
def gcg_task(cfg: dict, seed: int, inputs: dict) -> dict:
    """GCG of a cell: GCG and its control against the constrained arm, and transfer between the arms."""
    return run_seed_stage("gcg", cfg, seed, inputs)


@task(name="damage", task_run_name="damage-seed-{seed}")
def damage_task(cfg: dict, seed: int, inputs: dict) -> dict:
    """The damage-matched arm of a cell: the baseline perturbed to the constrained arm's
    validation loss, evaluated and attacked (no training)."""
    return run_seed_stage("damage", cfg, seed, inputs)


@task(name="ladder", task_run_name="ladder-seed-{seed}")
def ladder_task(cfg: dict, seed: int, inputs: dict) -> dict:
    """The quality ladder of a model: reference models evaluated and attacked like the arms."""
    return run_seed_stage("ladder", cfg, seed, inputs)


STAGE_TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        setup_task,
        constrain_task,
        train_baseline_task,
        train_monotonic_task,
        evaluate_baseline_task,
        evaluate_task,
        uat_baseline_task,
        uat_task,
        hotflip_baseline_task,
        hotflip_task,
        gcg_baseline_task,
        gcg_task,
        damage_task,
        ladder_task,
    )
}
if set(STAGE_TASKS) != set(SEED_STAGE_NAMES):  # a stage added to the registry needs its task here
    raise ImportError(f"tasks for stages {sorted(set(SEED_STAGE_NAMES) ^ set(STAGE_TASKS))} are missing or unknown")
