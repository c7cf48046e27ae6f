"""The per-seed pipeline as plain function calls, without an orchestrator.

A notebook (or a debugger) can run one seed end to end with `run_seed(cfg, 42)`. The Prefect flow
in `flows/` calls the very same stage functions, adding caching, retries and parallelism.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from monolm.config import ExperimentConfig
from monolm.core.deadline import stage_deadline
from monolm.core.private import private_scratch
from monolm.study import registry
from monolm.study.frame import StageRef, stage_errors
from monolm.study.layout import cell_paths
from monolm.study.registry import ATTACKS

log = logging.getLogger("monolm.pipeline")


@contextlib.contextmanager
def folder_lock(folder: Path, what: str) -> Iterator[None]:
    """One writer of a stage folder at a time on this machine: a second run of the same stage (the
    same seed, or another cell sharing the model's baseline stages) waits, then reuses what the
    first finished. Without it both redo the stage and move each other's folders aside mid-run.
    The lock file lives in this user's private scratch folder (`monolm.core.private`: 0700,
    checked before use; a predictable name in the shared /tmp could be taken by another user),
    so a run refused for bad inputs leaves the runs root untouched; across machines, the Prefect
    flow's file locks under `paths.runs_root` serialize stages instead."""
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    path = private_scratch() / f"stage-{key}.lock"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s (%s) is being run by another process; waiting for it to finish", what, folder)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def run_seed(
    cfg: ExperimentConfig, seed: int, *, stages: int | None = None, progress: bool = True
) -> dict[str, StageRef]:
    """Run stages 0..`stages` (default: all of a seed's) of one cell (`cfg` with one model, variant
    and init) for one seed, in order; finished stages with valid manifests are reused, the
    model's shared stages too. A full disk or an unwritable folder fails the stage with
    `StageFailed` naming it, one past `runner.stage_timeout_minutes` with `StageTimeout`; a
    second run of the same stage started meanwhile waits for this one (`folder_lock`)."""
    cell = cell_paths(cfg, seed)
    refs: dict[str, StageRef] = {}
    last = registry.last_seed_stage() if stages is None else stages
    for spec in registry.seed_stages():
        if spec.number > last:
            break
        inputs = {name: refs[name] for name in spec.inputs}
        folder = cell.stage(spec.name)
        timeout = cfg.runner.stage_timeout_minutes.get(spec.name)
        with (
            folder_lock(folder, f"stage {spec.name} of seed {seed}"),
            stage_errors(spec.name, seed, folder),
            stage_deadline(spec.name, timeout),  # checked by the stage between units of work
        ):
            refs[spec.name] = spec.function()(cfg, cell, inputs, progress=progress)
    return refs


def run_study(
    cfg: ExperimentConfig, *, stages: int | None = None, progress: bool = True
) -> dict[str, dict[int, dict[str, StageRef]]]:
    """Every cell of the study's grid for every seed (`run_seed`), one after another: {cell label:
    {seed: stage refs}}. A model's stages that do not depend on the constraint run once per seed
    (the library's whole study without an orchestrator: notebooks, and the ladder's sharing test)."""
    from monolm.study.cells import cells

    return {
        cell.label: {seed: run_seed(cell.cfg, seed, stages=stages, progress=progress) for seed in cfg.seeds}
        for cell in cells(cfg)
    }


def summary_rows(refs: dict[str, StageRef]) -> list[dict[str, Any]]:
    """One row per arm for the results table printed by `monolm run --no-prefect`: the same
    readable labels and units as stage 7's table, success rates in %."""
    ev = refs.get("evaluate")
    rows = []
    for name in ("base", "baseline", "monotonic"):
        row: dict[str, Any] = {"arm": name}
        if ev:
            row["test perplexity"] = ev.metrics.get(f"{name}_token_perplexity")
            row["bits per byte"] = ev.metrics.get(f"{name}_bits_per_byte")
        for attack, label in ATTACKS.items():
            ref = refs.get(attack)
            if ref and name in ref.metrics.get("per_model", {}):
                per_model = ref.metrics["per_model"][name]
                row[f"{label} damage (nats/token)"] = per_model.get("abs_increase")
                rate = per_model.get("success_rate")
                row[f"{label} success (%)"] = None if rate is None else 100 * rate
        rows.append(row)
    return rows
