"""What every stage shares: the reference a stage hands downstream, and finishing/skipping.

Stages exchange `StageRef`s (a folder, the digest of its manifest, headline metrics): small,
JSON-able, never a model object. A finished stage is recognised by a manifest whose outputs still
match their digests; anything else is re-run from scratch (or from its own checkpoints).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from monolm.artifacts import (CorruptArtifact, atomic_write_json, clean_temp_files, load_manifest, nearest_existing,
                              stage_dir_for, write_manifest)
from monolm.config import ExperimentConfig
from monolm.provenance import code_digest
from monolm.runtime import configure_threads

log = logging.getLogger("monolm.stages")

# Which config sections and which library modules determine each stage's output. This is the
# single source of truth for manifests and for the orchestrator's cache keys.
STAGE_CONFIG: dict[str, tuple[str, ...]] = {
    "setup": ("model", "data"),
    "constrain": ("constraint",),
    "train_baseline": ("training", "data.seq_len"),
    "train_monotonic": ("training", "data.seq_len", "constraint"),
    "evaluate": ("evaluation", "data.seq_len"),
    "uat": ("attacks.uat", "attacks.success_threshold"),
    "hotflip": ("attacks.hotflip", "attacks.success_threshold", "attacks.uat.n_opt_texts"),
}
# Library modules whose code determines each stage's output (the code-version part of its key).
_SHARED_CODE = ("config", "models", "data", "artifacts", "runtime", "stages.common")
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "setup": (*_SHARED_CODE, "training", "checkpoint", "stages.setup"),
    "constrain": (*_SHARED_CODE, "constraints", "monotonicity", "stages.constrain"),
    "train_baseline": (*_SHARED_CODE, "training", "checkpoint", "evaluation", "stages.train"),
    "train_monotonic": (*_SHARED_CODE, "training", "checkpoint", "evaluation", "constraints", "monotonicity",
                        "stages.train"),
    "evaluate": (*_SHARED_CODE, "evaluation", "constraints", "monotonicity", "stages.evaluate"),
    "uat": (*_SHARED_CODE, "attacks", "stats", "stages.attack"),
    "hotflip": (*_SHARED_CODE, "attacks", "stats", "stages.attack"),
}


@dataclass
class StageRef:
    stage: str
    seed: int
    dir: str
    digest: str  # sha256 of the stage's manifest.json: the input digest for downstream stages
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "StageRef":
        return cls(**data)

    @property
    def path(self) -> Path:
        return Path(self.dir)


def stage_config(cfg: ExperimentConfig, stage: str) -> dict[str, Any]:
    return cfg.subset(*STAGE_CONFIG[stage])


def stage_code_version(stage: str) -> str:
    return code_digest(*STAGE_CODE[stage])


def existing(cfg: ExperimentConfig, seed: int, stage: str, inputs: dict[str, StageRef]) -> StageRef | None:
    """The stage's earlier result if it finished with the same config, inputs and code, and its
    files still match their digests; else None (and a warning when something was corrupt)."""
    directory = stage_dir_for(cfg, seed, stage)
    try:
        manifest, digest = load_manifest(directory)
    except FileNotFoundError:
        return None
    except CorruptArtifact as exc:
        log.warning("not reusing %s: %s", directory, exc)
        return None
    expected_inputs = {name: ref.digest for name, ref in inputs.items()}
    if (manifest.config != stage_config(cfg, stage) or manifest.inputs != expected_inputs
            or manifest.metrics.get("code_version") != stage_code_version(stage)):
        return None
    return StageRef(stage, seed, str(directory), digest, manifest.metrics)


def work_key(cfg: ExperimentConfig, stage: str, inputs: dict[str, StageRef]) -> str:
    """What a stage folder's content is computed from: config subset, input digests, code."""
    payload = {"config": stage_config(cfg, stage), "inputs": {k: r.digest for k, r in sorted(inputs.items())},
               "code": stage_code_version(stage)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def prepare(cfg: ExperimentConfig, seed: int, stage: str, inputs: dict[str, StageRef] | None = None) -> Path:
    """The stage folder, ready for (re)computation.

    Leftovers of a killed writer (temp files) are removed, and a stale manifest first, so that a
    half-redone stage is never mistaken for a finished one. Work in progress (checkpoints,
    finished attack units) is kept for resuming only if it was computed from the same config,
    inputs and code (recorded in `.work.json` when the stage starts); otherwise the old folder is
    moved aside to `<stage>.superseded-<time>` with a warning, never resumed and never silently
    deleted.
    """
    configure_threads()
    directory = stage_dir_for(cfg, seed, stage)
    key = work_key(cfg, stage, inputs or {})
    marker = directory / ".work.json"
    if directory.exists():
        try:
            previous = json.loads(marker.read_text())["key"]
        except (OSError, ValueError, KeyError):
            previous = None
        if previous != key and any(directory.iterdir()):
            aside = directory.with_name(f"{directory.name}.superseded-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(directory, aside)
            log.warning("%s held work for a different config/inputs/code; moved it to %s", directory, aside)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "manifest.json").unlink(missing_ok=True)
    clean_temp_files(directory)
    atomic_write_json(marker, {"key": key, "stage": stage, "seed": seed})
    return directory


def finish(
    cfg: ExperimentConfig,
    seed: int,
    stage: str,
    directory: Path,
    *,
    inputs: dict[str, StageRef],
    outputs: list[str],
    metrics: dict[str, Any],
    started: float,
) -> StageRef:
    metrics = {**metrics, "code_version": stage_code_version(stage)}
    _, digest = write_manifest(
        directory,
        stage=stage,
        config=stage_config(cfg, stage),
        inputs={name: ref.digest for name, ref in inputs.items()},
        outputs=outputs,
        metrics=metrics,
        wall_time_s=time.time() - started,
    )
    log.info("stage %s (seed %d) finished in %.1f s -> %s", stage, seed, time.time() - started, directory)
    return StageRef(stage, seed, str(directory), digest, metrics)


def files_under(directory: Path, sub: str) -> list[str]:
    """Relative paths of every file under `directory/sub`, for a manifest's output list."""
    return sorted(str(p.relative_to(directory)) for p in (directory / sub).rglob("*") if p.is_file())


# --------------------------------------------------------------------------- environment failures
class StageFailed(RuntimeError):
    """A stage stopped by its environment (disk full, a folder it may not write), said plainly:
    which stage, where, and what a re-run resumes from."""


_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
_NOT_PERMITTED = {errno.EACCES, errno.EPERM, errno.EROFS}


def _environment_error(exc: BaseException) -> str | None:
    """"full" or "denied" for errors the machine (not the code) caused, else None. safetensors
    (Rust) reports a full disk as its own error type whose text carries the OS error."""
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        return "full"
    if isinstance(exc, OSError) and exc.errno in _NOT_PERMITTED:
        return "denied"
    if "No space left on device" in str(exc) or "os error 28" in str(exc):
        return "full"
    return None


def _free_space(directory: Path) -> str:
    try:
        free = shutil.disk_usage(nearest_existing(directory)).free
    except OSError:
        return "unknown space"
    return f"{free / 2**20:.1f} MiB free"


@contextlib.contextmanager
def stage_errors(stage: str, seed: int | None, directory: Path, setting: str = "paths.runs_root") -> Iterator[None]:
    """Turn a full disk or a refused write inside a stage into `StageFailed` with a message a user
    can act on, instead of a traceback ending in a bare `[Errno 28]` (or safetensors' I/O error)
    that names neither the stage nor the folder. Everything finished before the failure is
    intact, because every file is written atomically."""
    try:
        yield
    except Exception as exc:
        kind = _environment_error(exc)
        if kind is None:
            raise
        where = f"stage {stage}" + (f" (seed {seed})" if seed is not None else "")
        if kind == "full":
            message = (f"{where} failed: no space left on device while writing under {directory} "
                       f"({_free_space(directory)}). Everything written before is intact (finished stages, the "
                       "last valid checkpoint, finished attack units); free some space and re-run to resume.")
        else:
            target = getattr(exc, "filename", None) or directory
            message = (f"{where} failed: cannot write {target} ({getattr(exc, 'strerror', None) or exc}); "
                       f"check that {setting} points to a folder you may write")
        raise StageFailed(message) from exc
