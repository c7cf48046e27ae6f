"""The one wrapper every stage task uses: rebuild the config, forward logs, inject test faults,
call the library, remember what the cached result points to, record where it ran."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monolm.config import ExperimentConfig
from monolm.core.deadline import stage_deadline
from monolm.study.frame import StageRef, stage_errors
from monolm.study.layout import cell_paths
from monolm.study.registry import stage as stage_spec
from tasks.common import config_of, fault_after_step, forward_logs, maybe_inject_fault, remember_result, worker_context
from tasks.progress import StageProgress, compose, tracks_progress


def run_seed_stage(stage: str, cfg: dict[str, Any], seed: int, inputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Run per-seed `stage` of `seed` on the results of its input stages (task results, as JSON)."""
    config = config_of(cfg)
    cell = cell_paths(config, seed)
    refs = {name: as_ref(result) for name, result in inputs.items()}
    entry = stage_spec(stage).function()

    def call(c: ExperimentConfig) -> StageRef:
        tracker = StageProgress(stage, seed, c.run_name or c.default_run_name) if tracks_progress(stage) else None
        ref = entry(c, cell, refs, progress=False, on_log=compose(tracker, fault_after_step(stage)))
        if tracker is not None:
            tracker.finish()
        return ref

    return run_stage(stage, config, seed, cell.stage(stage), call)


def run_stage(
    stage: str,
    cfg: dict[str, Any] | ExperimentConfig,
    seed: int | None,
    directory: Path,
    call: Callable[[ExperimentConfig], Any],
) -> dict[str, Any]:
    """`call(config)` with the library's logs in the task run, test faults injected, a full disk
    or refused write reported as `StageFailed` naming `directory`, the stage's own deadline
    (`runner.stage_timeout_minutes`) set, and the result remembered for the cache-validity check."""
    config = config_of(cfg)
    with forward_logs() as log:
        log.info(
            "stage %s%s starting on %s", stage, f" seed {seed}" if seed is not None else "", worker_context()["host"]
        )
        maybe_inject_fault(stage)
        quiet_library_progress_bars()
        started = time.time()
        # The stage checks its own deadline between units of work: Prefect's timeout alone may
        # never land in a busy thread (monolm.core.deadline).
        timeout = config.runner.stage_timeout_minutes.get(stage)
        with stage_errors(stage, seed, directory), stage_deadline(stage, timeout):
            ref = call(config)
        result = ref.to_json() if hasattr(ref, "to_json") else ref
        result["worker"] = worker_context()
        log.info("stage %s done in %.1f s", stage, time.time() - started)
    remember_result(config, result)
    return result


def quiet_library_progress_bars() -> None:
    """No `transformers` bars ("Loading weights", "Writing model shards") between a task's log
    lines: under the orchestrator progress is shown by log lines and progress artifacts."""
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def as_ref(result: dict[str, Any] | None) -> StageRef | None:
    """A stage task's JSON result back as the library's StageRef (extra keys such as `worker` dropped)."""
    if result is None:
        return None
    return StageRef.from_json({k: result[k] for k in ("stage", "seed", "dir", "digest", "metrics")})
