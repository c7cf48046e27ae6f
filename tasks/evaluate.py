"""Stage 4 task: perplexity of base, baseline and monotonic on held-out text."""

from prefect import task

from monolm.stages import evaluate
from tasks.stage import as_ref as _ref, run_stage


@task(name="evaluate", task_run_name="evaluate-seed-{seed}")
def evaluate_task(cfg: dict, seed: int, setup: dict, train_baseline: dict, train_monotonic: dict) -> dict:
    return run_stage("evaluate", cfg, seed, lambda c: evaluate.run(
        c, seed, _ref(setup), _ref(train_baseline), _ref(train_monotonic), progress=False))
