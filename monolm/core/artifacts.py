"""Atomic, checksummed files and the per-stage manifest.

Why: multi-day runs are preempted and disks fill. Every file is written to a temp file in the same
directory, fsynced, and renamed over the target, so a reader sees either the old file or the whole
new one, never half of one. Each stage ends by writing `manifest.json` (last, atomically) listing
its outputs with sha256; a stage folder without a valid manifest, or whose files no longer match
it, is not trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"


class CorruptArtifact(RuntimeError):
    """A file that exists but cannot be trusted (digest mismatch, truncated, unparsable)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


# --------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync and rename it over `path`.

    On any exception (including ENOSPC) the temp file is removed and `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable (best effort: some filesystems refuse)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(directory: Path) -> None:
    """fsync every file and folder under `directory` before it is renamed into place."""
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    for d in [Path(directory), *[p for p in Path(directory).rglob("*") if p.is_dir()]]:
        fsync_dir(d)


def nearest_existing(path: str | Path) -> Path:
    """`path` or its closest existing parent: the file system a folder yet to be created will be
    on, for free-space and permission checks made before anything is written."""
    probe = Path(path).expanduser().resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


@contextlib.contextmanager
def atomic_dir(
    target: str | Path, *, existing: Literal["error", "replace"] | Callable[[Path], Any] = "error"
) -> Iterator[Path]:
    """Yield a temp directory beside `target`; on success fsync it and rename it to `target`, so
    readers see the whole folder or none of it (models, constrained models, checkpoints).

    `existing` says what happens to a directory already at `target`: `error` refuses, `replace`
    swaps it out and deletes it (for a folder we own and mean to supersede, like `best/`), a
    callable moves it out of the way itself (checkpoints keep it under `.invalid/`).
    On any exception the temp directory is removed and `target` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{target.name}-", dir=target.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        old: Path | None = None
        if target.exists():
            if existing == "error":
                raise FileExistsError(f"{target} already exists")
            if existing == "replace":
                old = target.parent / f".old-{target.name}-{uuid.uuid4().hex[:8]}"
                os.replace(target, old)
            else:
                existing(target)
        os.replace(tmp, target)
        fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_replaced(target: str | Path) -> bool:
    """If a crash hit between the two renames of `atomic_dir(existing="replace")`, put the old
    directory back. Returns True when something was restored."""
    target = Path(target)
    if target.exists() or not target.parent.is_dir():
        return False
    olds = sorted(target.parent.glob(f".old-{target.name}-*"), key=lambda p: p.stat().st_mtime)
    if not olds:
        return False
    os.replace(olds[-1], target)
    logging.getLogger("monolm.artifacts").warning("restored %s from %s (an interrupted replacement)", target, olds[-1])
    return True


def atomic_write_bytes(path: str | Path, data: bytes) -> str:
    """Write atomically; return the sha256 of what was written."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def atomic_write_text(path: str | Path, text: str) -> str:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 2) -> str:
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=json_default) + "\n")


def json_default(obj: Any) -> Any:
    """`json.dumps(default=...)` for what monolm writes: paths, numpy/torch scalars and arrays."""
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | Path, expected_sha256: str | None = None) -> Any:
    """Read JSON, verifying its digest when one is known; raise CorruptArtifact otherwise."""
    path = Path(path)
    data = path.read_bytes()
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise CorruptArtifact(path, "sha256 does not match the digest recorded when it was written")
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptArtifact(path, f"not valid JSON ({exc})") from None


# --------------------------------------------------------------------------- manifests
@dataclass
class Manifest:
    stage: str
    config: dict[str, Any]
    inputs: dict[str, str]  # name -> digest of an input (usually another stage's manifest digest)
    outputs: dict[str, str]  # path relative to the stage folder -> sha256
    metrics: dict[str, Any]
    wall_time_s: float
    provenance: dict[str, Any]
    created_at: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def write_manifest(
    directory: str | Path,
    *,
    stage: str,
    config: dict[str, Any],
    inputs: dict[str, str],
    outputs: list[str] | dict[str, str],
    metrics: dict[str, Any],
    wall_time_s: float,
    provenance: dict[str, Any] | None = None,
) -> tuple[Manifest, str]:
    """Checksum `outputs` (paths relative to `directory`) and write the manifest last, atomically.

    Returns the manifest and its own sha256, which downstream stages use as their input digest.
    """
    from monolm.core.provenance import provenance as _prov

    directory = Path(directory)
    digests = dict(outputs) if isinstance(outputs, dict) else {rel: sha256_file(directory / rel) for rel in outputs}
    manifest = Manifest(
        stage=stage,
        config=config,
        inputs=inputs,
        outputs=digests,
        metrics=metrics,
        wall_time_s=round(wall_time_s, 3),
        provenance=provenance if provenance is not None else _prov(),
        created_at=time.time(),
    )
    digest = atomic_write_json(directory / MANIFEST, manifest.to_json())
    return manifest, digest


def load_manifest(directory: str | Path, *, verify_outputs: bool = True) -> tuple[Manifest, str]:
    """Load a stage's manifest; with `verify_outputs`, check every listed file's sha256.

    Raises FileNotFoundError when there is no manifest (the stage never finished) and
    CorruptArtifact when the manifest or any output cannot be trusted.
    """
    directory = Path(directory)
    path = directory / MANIFEST
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    try:
        data = json.loads(raw)
        manifest = Manifest(**data)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
        raise CorruptArtifact(path, f"unreadable manifest ({exc})") from None
    if verify_outputs:
        verify_outputs_match(directory, manifest.outputs)
    return manifest, digest


def verify_outputs_match(directory: Path, outputs: dict[str, str]) -> None:
    for rel, expected in outputs.items():
        target = directory / rel
        if not target.is_file():
            raise CorruptArtifact(target, "listed in the manifest but missing")
        if sha256_file(target) != expected:
            raise CorruptArtifact(target, "sha256 differs from the manifest (altered or truncated)")


def manifest_is_valid(directory: str | Path) -> bool:
    try:
        load_manifest(directory)
    except (FileNotFoundError, CorruptArtifact):
        return False
    return True


def clean_temp_files(directory: str | Path) -> int:
    """Remove temp files left by a killed writer (they are never read). Returns how many."""
    count = 0
    for tmp in Path(directory).rglob(TMP_PREFIX + "*"):
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            tmp.unlink()
            count += 1
    return count
