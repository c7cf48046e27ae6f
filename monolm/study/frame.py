"""What every stage shares: the reference a stage hands downstream, and finishing/skipping.

Stages exchange `StageRef`s (a folder, the digest of its manifest, headline metrics): small,
JSON-able, never a model object. A finished stage is recognised by a manifest whose outputs still
match their digests; anything else is re-run from scratch (or from its own checkpoints).
`framed` runs a stage's own computation inside that frame (skip, prepare, compute, finish).
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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from monolm.config import ExperimentConfig
from monolm.core.artifacts import (
    CorruptArtifact,
    atomic_write_json,
    clean_temp_files,
    load_manifest,
    nearest_existing,
    read_json,
    write_manifest,
)
from monolm.core.code_digest import code_digest
from monolm.core.deadline import check_deadline
from monolm.core.runtime import configure_threads
from monolm.study.layout import CellPaths
from monolm.study.registry import stage as stage_spec

log = logging.getLogger("monolm.stages")

# A stage's progress callback: training log and evaluation entries ({"kind": "train"|"eval", ...}).
OnLog = Callable[[dict[str, Any]], None]


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
    def from_json(cls, data: dict[str, Any]) -> StageRef:
        return cls(**data)

    @property
    def path(self) -> Path:
        return Path(self.dir)


Inputs = Mapping[str, StageRef]


def stage_config(cfg: ExperimentConfig, stage: str) -> dict[str, Any]:
    """The part of the config that decides `stage`'s output (the whole config for stage 7)."""
    sections = stage_spec(stage).config
    return cfg.model_dump(mode="json") if sections is None else cfg.subset(*sections)


def stage_code_version(stage: str) -> str:
    """The digest of the code that computes `stage`: its entry module's import closure."""
    return code_digest(stage_spec(stage).module)


def existing(cfg: ExperimentConfig, cell: CellPaths, stage: str, inputs: Inputs) -> StageRef | None:
    """The stage's earlier result if it finished with the same config, inputs and code, and its
    files still match their digests; else None (and a warning when something was corrupt).

    A finished result that a config change superseded is kept as `<stage>.superseded-<work key>`
    (see `prepare`); when the config returns to it, it is moved back and reused, not recomputed."""
    directory = cell.stage(stage)
    ref = _matching(cfg, cell, stage, inputs, directory)
    if ref is not None:
        return ref
    kept = superseded_dir(directory, work_key(cfg, stage, inputs))
    ref = _matching(cfg, cell, stage, inputs, kept)  # names `directory`, where it is moved back to
    if ref is None:
        return None
    if directory.exists() and any(directory.iterdir()):
        _move_aside(directory)
    shutil.rmtree(directory, ignore_errors=True)  # an empty folder (or nothing) left behind
    os.replace(kept, directory)
    log.info("reusing %s: the result kept from when the config was last the same", directory)
    return ref


def _matching(cfg: ExperimentConfig, cell: CellPaths, stage: str, inputs: Inputs, directory: Path) -> StageRef | None:
    """The finished result in `directory` if it was computed from this config, inputs and code."""
    try:
        manifest, digest = load_manifest(directory)
    except FileNotFoundError:
        return None
    except CorruptArtifact as exc:
        log.warning("not reusing %s: %s", directory, exc)
        return None
    expected_inputs = {name: ref.digest for name, ref in inputs.items()}
    if (
        manifest.config != stage_config(cfg, stage)
        or manifest.inputs != expected_inputs
        or manifest.metrics.get("code_version") != stage_code_version(stage)
    ):
        return None
    return StageRef(stage, cell.seed, str(cell.stage(stage)), digest, manifest.metrics)


SUPERSEDED = ".superseded-"  # `<stage>.superseded-<work key or time>`: moved aside, never deleted silently


def superseded_dir(directory: Path, key: str) -> Path:
    """Where `directory`'s finished result computed under work key `key` is kept once superseded."""
    return directory.with_name(f"{directory.name}{SUPERSEDED}{key}")


def _move_aside(directory: Path) -> Path:
    """Move `directory` out of the way of a different computation. A finished result goes to
    `<stage>.superseded-<its work key>`, where `existing` finds it again if the config comes back
    (replacing an older copy of the same key: the same inputs, config and code); unfinished work
    goes to `<stage>.superseded-<time>` (kept as evidence, never resumed)."""
    try:
        key = json.loads((directory / ".work.json").read_text())["key"]
        load_manifest(directory)
    except (OSError, ValueError, KeyError, CorruptArtifact):
        key = None
    if key is None:
        aside = directory.with_name(f"{directory.name}{SUPERSEDED}{time.strftime('%Y%m%d-%H%M%S')}")
    else:
        aside = superseded_dir(directory, key)
        shutil.rmtree(aside, ignore_errors=True)
    os.replace(directory, aside)
    return aside


def work_key(cfg: ExperimentConfig, stage: str, inputs: Inputs) -> str:
    """What a stage folder's content is computed from: config subset, input digests, code."""
    payload = {
        "config": stage_config(cfg, stage),
        "inputs": {k: r.digest for k, r in sorted(inputs.items())},
        "code": stage_code_version(stage),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def prepare(cfg: ExperimentConfig, cell: CellPaths, stage: str, inputs: Inputs) -> Path:
    """The stage folder, ready for (re)computation.

    Leftovers of a killed writer (temp files) are removed, and a stale manifest first, so that a
    half-redone stage is never mistaken for a finished one. Work in progress (checkpoints,
    finished attack units) is kept for resuming only if it was computed from the same config,
    inputs and code (recorded in `.work.json` when the stage starts); otherwise the old folder is
    moved aside with a warning, never silently deleted: a finished result to
    `<stage>.superseded-<work key>` (reused by `existing` when the config returns to it), unfinished
    work to `<stage>.superseded-<time>` (never resumed). `monolm clean` lists and removes them.
    """
    configure_threads()
    directory = cell.stage(stage)
    key = work_key(cfg, stage, inputs)
    marker = directory / ".work.json"
    if directory.exists():
        try:
            previous = json.loads(marker.read_text())["key"]
        except (OSError, ValueError, KeyError):
            previous = None
        if previous != key and any(directory.iterdir()):
            aside = _move_aside(directory)
            log.warning("%s held work for a different config/inputs/code; moved it to %s", directory, aside)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "manifest.json").unlink(missing_ok=True)
    clean_temp_files(directory)
    atomic_write_json(marker, {"key": key, "stage": stage, "seed": cell.seed})
    return directory


def finish(
    cfg: ExperimentConfig,
    cell: CellPaths,
    stage: str,
    *,
    inputs: Inputs,
    outputs: list[str],
    metrics: dict[str, Any],
    started: float,
) -> StageRef:
    """Write the stage's manifest (last, atomically) and return the reference downstream stages get."""
    check_deadline("before writing its manifest")  # a timed-out stage never finishes
    directory = cell.stage(stage)
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
    log.info("stage %s (seed %d) finished in %.1f s -> %s", stage, cell.seed, time.time() - started, directory)
    return StageRef(stage, cell.seed, str(directory), digest, metrics)


# What a stage computes in its prepared folder: (its outputs, relative to the folder; its metrics).
Compute = Callable[[Path], tuple[list[str], dict[str, Any]]]


def framed(cfg: ExperimentConfig, cell: CellPaths, stage: str, inputs: Inputs, compute: Compute) -> StageRef:
    """Every stage's frame, in one place so that none can skip a step: the earlier result if it
    still holds (`existing`); else the folder made ready (`prepare`), `compute(folder)` run in it,
    and the manifest written last (`finish`), its wall time counted from before `prepare`."""
    done = existing(cfg, cell, stage, inputs)
    if done:
        return done
    started = time.time()
    out = prepare(cfg, cell, stage, inputs)
    outputs, metrics = compute(out)
    return finish(cfg, cell, stage, inputs=inputs, outputs=outputs, metrics=metrics, started=started)


def read_output(ref: StageRef, rel: str) -> Any:
    """A JSON output of a finished input stage, trusted only if it matches the digest its
    manifest recorded (and the manifest is the one `ref` was handed over with)."""
    manifest, digest = load_manifest(ref.path, verify_outputs=False)
    if digest != ref.digest:
        raise CorruptArtifact(ref.path / "manifest.json", "differs from the manifest this stage was given")
    if rel not in manifest.outputs:
        raise CorruptArtifact(ref.path / rel, f"not an output of stage {ref.stage}")
    return read_json(ref.path / rel, expected_sha256=manifest.outputs[rel])


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
    """ "full" or "denied" for errors the machine (not the code) caused, else None. safetensors
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
            message = (
                f"{where} failed: no space left on device while writing under {directory} "
                f"({_free_space(directory)}). Everything written before is intact (finished stages, the "
                "last valid checkpoint, finished attack units); free some space and re-run to resume."
            )
        else:
            target = getattr(exc, "filename", None) or directory
            message = (
                f"{where} failed: cannot write {target} ({getattr(exc, 'strerror', None) or exc}); "
                f"check that {setting} points to a folder you may write"
            )
        raise StageFailed(message) from exc
