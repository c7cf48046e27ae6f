"""The one wrapper every stage task uses: rebuild the config, forward logs, inject test faults,
call the library, remember what the cached result points to, record where it ran."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from monolm.artifacts import stage_dir_for
from monolm.stages.common import StageRef, stage_errors
from tasks.common import config_of, forward_logs, maybe_inject_fault, remember_result, worker_context


def run_stage(stage: str, cfg: dict[str, Any], seed: int | None, call: Callable[..., Any]) -> dict[str, Any]:
    config = config_of(cfg)
    with forward_logs() as log:
        log.info("stage %s%s starting on %s", stage, f" seed {seed}" if seed is not None else "", worker_context()["host"])
        maybe_inject_fault(stage)
        started = time.time()
        directory = stage_dir_for(config, seed, stage) if seed is not None else config.paths.results_root
        with stage_errors(stage, seed, directory):
            ref = call(config)
        result = ref.to_json() if hasattr(ref, "to_json") else ref
        result["worker"] = worker_context()
        log.info("stage %s done in %.1f s", stage, time.time() - started)
    remember_result(config, result)
    return result


def as_ref(result: dict[str, Any] | None) -> StageRef | None:
    """A stage task's JSON result back as the library's StageRef (extra keys such as `worker` dropped)."""
    if result is None:
        return None
    return StageRef.from_json({k: result[k] for k in ("stage", "seed", "dir", "digest", "metrics")})
