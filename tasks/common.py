"""What every stage task shares: the cache policy, run options, log forwarding, fault injection.

Cache keys. Prefect's default policy includes the flow-run id (no reuse across runs); `INPUTS`
alone gave two different tasks with equal inputs the same key; `TASK_SOURCE` hashes only the task
function, so an edited `monolm` helper returned a stale result. `StageCachePolicy` keys on exactly
what determines a stage's output: the stage name, its folder, its config subset, the digests of
its input stages and a digest of the `monolm` modules it runs. A cache hit is only allowed while
the stage's files still exist and match their manifest; otherwise the key changes and the stage
re-runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.serializers import JSONSerializer

from monolm.config import ExperimentConfig, build_config
from monolm.core.artifacts import atomic_write_json
from monolm.study.frame import stage_code_version, stage_config
from monolm.study.layout import cell_paths
from tasks.locks import LivenessLockManager

MAX_ARTIFACT_KEY = 100


def artifact_key(kind: str, run_name: str) -> str:
    """`<kind>-<run-name>` reduced to what Prefect accepts: lowercase letters, digits, dashes."""
    slug = re.sub(r"[^a-z0-9]+", "-", run_name.lower()).strip("-") or "run"
    return f"{kind}-{slug}"[:MAX_ARTIFACT_KEY].rstrip("-")


def config_of(cfg: dict[str, Any] | ExperimentConfig) -> ExperimentConfig:
    return cfg if isinstance(cfg, ExperimentConfig) else build_config(cfg)


def stage_key(cfg: ExperimentConfig, stage: str, seed: int | None, refs: dict[str, Any]) -> str:
    """The deterministic part of a stage's cache key: the stage, its folder, its config subset, the
    digests of its inputs and its code version."""
    payload = {
        "stage": stage,
        "seed": seed,
        "folder": str(cell_paths(cfg, seed).stage(stage).resolve()) if seed is not None else None,
        "config": stage_config(cfg, stage),
        "inputs": {name: _digest_of(ref) for name, ref in sorted(refs.items())},
        "code": stage_code_version(stage),
    }
    return f"{stage}-" + hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _digest_of(ref: Any) -> Any:
    if isinstance(ref, dict) and "digest" in ref:
        return ref["digest"]
    if isinstance(ref, list):
        return [_digest_of(r) for r in ref]
    if isinstance(ref, dict):
        return {k: _digest_of(v) for k, v in sorted(ref.items())}
    return ref


@dataclass
class StageCachePolicy(CachePolicy):
    """Cache key = f(stage, seed folder, config subset, input digests, library code digest)."""

    stage: str = ""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str:
        cfg = config_of(inputs["cfg"])
        seed = inputs.get("seed")
        refs = {k: v for k, v in inputs.items() if k not in ("cfg", "seed")}
        key = stage_key(cfg, self.stage, seed, refs)
        if self.key_storage and not cached_result_still_valid(cfg, key):
            # The files this key's cached result points to are gone or altered: drop the record
            # so the stage re-runs and its fresh result is stored under the same key.
            (Path(str(self.key_storage)) / key).unlink(missing_ok=True)
        return key


def _ref_sidecar(cfg: ExperimentConfig, key: str) -> Path:
    return cache_dirs(cfg)[1].parent / "refs" / f"{key}.json"


def remember_result(cfg: ExperimentConfig, result: Any) -> None:
    """Record which stage folders (and manifest digests) the current task's cached result names."""
    from prefect.transactions import get_transaction

    txn = get_transaction()  # the task's cache key is its transaction's key
    key = txn.key if txn else None
    if key:
        refs = result if isinstance(result, list) else [result]
        atomic_write_json(
            _ref_sidecar(cfg, key),
            [{"dir": r.get("dir"), "digest": r.get("digest"), "files": r.get("files", [])} for r in refs],
        )


def _record_is_json(cfg: ExperimentConfig, key: str) -> bool:
    """Prefect deserializes a cached result with whatever serializer its stored record names;
    accept only plain-JSON records (no object decoder), so a planted or old pickle record is a
    miss: never unpickled, never turned into objects."""
    record = cache_dirs(cfg)[1] / key
    try:
        serializer = json.loads(record.read_bytes())["serializer"]
        return serializer["type"] == "json" and serializer.get("object_decoder") is None
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _same_results(ref: dict) -> bool:
    """Stage 7's folder still holds the results it returned (the digest of its grid.json or
    results.json), not another configuration's under the same run name."""
    import hashlib

    for name in ("grid.json", "results.json"):
        path = Path(ref["dir"]) / name
        if path.is_file():
            return not ref.get("digest") or hashlib.sha256(path.read_bytes()).hexdigest() == ref["digest"]
    return False


def cached_result_still_valid(cfg: ExperimentConfig, key: str) -> bool:
    """A cache hit is allowed only if every folder the cached result names still has a valid
    manifest with the very digest that was returned (or, for stage 7, its files still exist)."""
    from monolm.core.artifacts import load_manifest

    sidecar = _ref_sidecar(cfg, key)
    if not sidecar.is_file() or not _record_is_json(cfg, key):
        return False
    try:
        for ref in json.loads(sidecar.read_text()):
            if ref.get("files"):
                if not all(Path(f).is_file() for f in ref["files"]) or not _same_results(ref):
                    return False
                continue
            _, digest = load_manifest(ref["dir"])
            if digest != ref["digest"]:
                return False
    except Exception:  # missing, corrupt, unreadable: not trusted
        return False
    return True


def cache_dirs(cfg: ExperimentConfig) -> tuple[Path, Path, Path]:
    """Result storage, cache-key storage and lock files, shared by every worker (on a cluster
    `paths.runs_root` must be on a shared filesystem)."""
    root = Path(cfg.paths.runs_root).resolve() / ".prefect"
    return root / "results", root / "keys", root / "locks"


_saved_storage: dict[str, str] = {}


def result_storage_slug(path: Path) -> str:
    """Prefect 3 requires result storage saved server-side: save one `LocalFileSystem` block per
    results folder (named by a digest of its path) and refer to it by slug."""
    path = path.resolve()
    if str(path) not in _saved_storage:
        from prefect.filesystems import LocalFileSystem

        name = "monolm-results-" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
        LocalFileSystem(basepath=str(path)).save(name, overwrite=True)
        _saved_storage[str(path)] = f"local-file-system/{name}"
    return _saved_storage[str(path)]


def stage_options(cfg: ExperimentConfig, stage: str) -> dict[str, Any]:
    """`Task.with_options(...)` for one stage: persisted results under the runs root, the stage
    cache policy with serialized execution (two flows on one seed: one waits, then reuses),
    retries with a delay, and the configured timeout."""
    results, keys, locks = cache_dirs(cfg)
    for d in (results, keys, locks):
        d.mkdir(parents=True, exist_ok=True)
    policy = StageCachePolicy(stage=stage).configure(
        # Locks die with their holder (a scancel'ed worker must not lock its stage forever).
        key_storage=str(keys),
        isolation_level="SERIALIZABLE",
        lock_manager=LivenessLockManager(locks),
    )
    timeout_min = cfg.runner.stage_timeout_minutes.get(stage)
    return {
        "cache_policy": policy,
        "persist_result": True,
        "result_storage": result_storage_slug(results),
        # Results are small dicts of JSON types: plain JSON, no pickle and no class-instantiating
        # decoder, so a cache hit never unpickles or constructs anything.
        "result_serializer": JSONSerializer(object_encoder=None, object_decoder=None),
        "retries": cfg.runner.retries,
        "retry_delay_seconds": cfg.runner.retry_delay_seconds,
        "timeout_seconds": timeout_min * 60 if timeout_min else None,
    }


# --------------------------------------------------------------------------- logs
@contextlib.contextmanager
def forward_logs() -> Iterator[logging.LoggerAdapter]:
    """Send the library's `monolm` log lines of this thread to the task run's logger: stored in
    the task run's logs (the UI) and printed once on the console by Prefect's console handler. Not
    also by the library's own handler, nor by the root logger's (`monolm.core.logs.setup_logging`)."""
    from prefect.logging import get_run_logger

    from monolm.core.logs import route_thread

    run_logger = get_run_logger()
    formatter = logging.Formatter("%(name)s: %(message)s")

    def sink(record: logging.LogRecord) -> None:
        run_logger.log(record.levelno, "%s", formatter.format(record))

    lib = logging.getLogger("monolm")
    previous = lib.level
    if lib.level == logging.NOTSET or lib.level > logging.INFO:
        lib.setLevel(logging.INFO)
    try:
        with route_thread(sink):
            yield run_logger
    finally:
        lib.setLevel(previous)


# --------------------------------------------------------------------------- fault injection
def maybe_inject_fault(stage: str) -> None:
    """For tests of retries: `MONOLM_FAULTS=<file>` holding {"<stage>": <remaining failures>}
    makes that stage fail that many times. Never set in normal use."""
    path = os.environ.get("MONOLM_FAULTS")
    if not path or not Path(path).is_file():
        return
    faults = json.loads(Path(path).read_text() or "{}")
    remaining = int(faults.get(stage, 0))
    if remaining > 0:
        faults[stage] = remaining - 1
        atomic_write_json(path, faults)
        raise RuntimeError(f"injected fault in stage {stage} (MONOLM_FAULTS={path})")


def fault_after_step(stage: str):
    """An `on_log` hook for training: `MONOLM_FAULTS` entry {"<stage>@<step>": n} fails the stage
    (n times) once training has logged that step, i.e. mid-run, after checkpoints were written."""

    def hook(entry: dict) -> None:
        path = os.environ.get("MONOLM_FAULTS")
        if not path or not Path(path).is_file():
            return
        faults = json.loads(Path(path).read_text() or "{}")
        for key, remaining in faults.items():
            name, _, step = key.partition("@")
            if name == stage and step and int(remaining) > 0 and entry.get("step", 0) >= int(step):
                faults[key] = int(remaining) - 1
                atomic_write_json(path, faults)
                raise RuntimeError(f"injected fault in stage {stage} at step {entry.get('step')}")

    return hook


def worker_context() -> dict[str, Any]:
    """Where a stage ran: host, SLURM job id (if any), visible GPUs. Recorded with each result."""
    import socket

    return {
        "host": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "pid": os.getpid(),
    }
