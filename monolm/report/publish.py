"""Putting stage 7's results folder in place without ever losing a folder.

`results_root/<run name>` is replaced only when it is a results folder of the same run (its
manifest is stage 7's, for this run name and the same study digest). Another configuration's
results under an explicitly re-used name are kept aside as `<name>-<their digest>`; anything else
there (a home folder's `Documents`) is refused and left as it is. One publish of a name at a
time: a lock file beside the folder (`.<name>.lock`, flock) is held from the temporary folder's
creation to the backup's removal, so two concurrent publishes of one name cannot delete each
other's temporary or previous folder.

The swap is two renames and one store transaction:

    final -> .old-<name>-<hex>      (_move_aside)
    .tmp-<name>-<hex> -> final      (_put_in_place)
    store rows committed            (store.record_run; the run row's created_at is the manifest's)
    .old-<name>-<hex> removed       (_drop_backup)

A kill at any step is repaired by the next publish of the name, under the lock (`recover`): a
missing folder with a backup gets the backup back; a folder whose run the store does not hold at
its manifest's time (killed before the commit) is taken away and the backup restored; a committed
one keeps its place and the backup goes. Either way the folder and the store agree.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import glob
import hashlib
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from monolm.config import ExperimentConfig
from monolm.config.base import ConfigError, check_run_name, study_digest_of
from monolm.core.artifacts import Manifest, fsync_dir, load_manifest, write_manifest
from monolm.core.provenance import provenance
from monolm.store import ResultsStore

log = logging.getLogger("monolm.stages")

STAGE = "aggregate"
RESULTS_OF = "results_of"  # the manifest's metrics key that says whose results folder it is


class NotAResultsFolder(ConfigError):
    """The folder stage 7 would replace is not a results folder of this run: nothing is touched."""


def safe_name(run_name: str) -> str:
    """A run name that is a plain folder name (`check_run_name`), never echoed in the error."""
    if not run_name:
        raise ValueError("run_name: empty; it names the results folder")
    check_run_name(run_name)
    return run_name


@contextlib.contextmanager
def publish_lock(root: Path, name: str) -> Iterator[None]:
    """Hold the exclusive lock of results folder `name` (blocks while another publish holds it)."""
    fd = os.open(root / f".{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _manifest(folder: Path) -> Manifest | None:
    try:
        return load_manifest(folder, verify_outputs=False)[0]
    except (OSError, ValueError):
        return None


def owner_check(final: Path) -> str | None:
    """The study digest of the results folder `final` (None: there is none); refuse anything
    there that is not a results folder of this run name."""
    if not final.exists() and not final.is_symlink():
        return None
    manifest = None if final.is_symlink() or not final.is_dir() else _manifest(final)
    owner = _owner(manifest) if manifest and manifest.stage == STAGE else {}
    if owner.get("run_name") != final.name or not owner.get("study_digest"):
        raise NotAResultsFolder(
            f"run_name: the folder it names under paths.results_root ({final}) exists and is not a monolm "
            "results folder of this run; nothing was changed. Choose another run_name or results_root."
        )
    return str(owner["study_digest"])


def keep_aside(final: Path, digest: str) -> Path:
    """Move the results of another configuration under this run name (an explicit `run_name`
    re-used with another config) to `<name>-<its digest, 8 hex>` instead of replacing them; an
    archive already there must be the same run's results of that configuration."""
    archive = final.with_name(f"{final.name}-{digest[:8]}")
    if archive.exists() or archive.is_symlink():
        manifest = None if archive.is_symlink() or not archive.is_dir() else _manifest(archive)
        owner = _owner(manifest) if manifest and manifest.stage == STAGE else {}
        if owner.get("run_name") != final.name or owner.get("study_digest") != digest:
            raise NotAResultsFolder(
                f"run_name: {final} holds another configuration's results and {archive.name}, where they "
                "would be kept, is taken; nothing was changed. Choose another run_name."
            )
        shutil.rmtree(archive)  # an older copy of the very same configuration's results
    os.replace(final, archive)
    fsync_dir(final.parent)
    log.warning("aggregate: %s held another configuration's results; kept as %s", final, archive.name)
    return archive


def check_results_folder(cfg: ExperimentConfig) -> None:
    """Before any compute: the run's results folder is free or a results folder of this run."""
    name = safe_name(cfg.run_name or cfg.default_run_name)
    owner_check(Path(cfg.paths.results_root).resolve() / name)


def _owner(manifest: Manifest) -> dict[str, Any]:
    """Whose results folder a stage 7 manifest is; one written before `results_of` existed is
    its config's run name and study digest."""
    if RESULTS_OF in manifest.metrics:
        return manifest.metrics[RESULTS_OF] or {}
    return {"run_name": manifest.config.get("run_name"), "study_digest": study_digest_of(manifest.config)}


def _committed(store: ResultsStore, manifest: Manifest) -> bool:
    """Whether the store holds the run of this folder as published with it (its created_at)."""
    run_id = (manifest.metrics.get(RESULTS_OF) or {}).get("run_id")
    row = store.get_run(run_id) if run_id else None
    if row is None or not row.get("created_at"):
        return False
    return abs(dt.datetime.fromisoformat(row["created_at"]).timestamp() - manifest.created_at) < 1e-3


def _leftovers(root: Path, kind: str, name: str) -> list[Path]:
    """`<kind>-<name>-<8 chars>` folders: this name's own (not those of `<name>-<more>`, another
    run with its own lock), matched with the name escaped for the glob."""
    prefix = f"{kind}-{name}-"
    return [
        p
        for p in root.glob(f"{glob.escape(prefix)}*")
        if len(p.name) == len(prefix) + 8 and "-" not in p.name[len(prefix) :] and p.is_dir() and not p.is_symlink()
    ]


def recover(root: Path, name: str, store: ResultsStore) -> None:
    """Repair what a killed publish of `name` left (call under `publish_lock`): temporary folders
    go; a backup is restored unless the folder in place is committed in the store."""
    for leftover in _leftovers(root, ".tmp", name):
        shutil.rmtree(leftover, ignore_errors=True)
    backups = sorted(_leftovers(root, ".old", name), key=lambda p: p.stat().st_mtime)
    if not backups:
        return
    final = root / name
    current = _manifest(final) if final.is_dir() else None
    if current is not None and _committed(store, current):
        for backup in backups:
            _drop_backup(backup)
        return
    if final.exists() or final.is_symlink():
        owner_check(final)  # only a results folder of this run is ever taken away
        log.warning("aggregate: %s was put in place but not recorded in the store; restoring the previous one", final)
        shutil.rmtree(final)
    os.replace(backups[-1], final)
    log.warning("aggregate: restored %s from the backup a killed publish left", final)
    fsync_dir(root)


def _move_aside(final: Path) -> Path:
    old = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
    os.replace(final, old)
    return old


def _put_in_place(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)
    fsync_dir(final.parent)


def _drop_backup(old: Path) -> None:
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def published(tmp: Path, final: Path) -> Iterator[None]:
    """Put the finished temp folder in place as `final` for the body of the `with` (which
    records the store rows): if the body fails, the new folder is removed and the previous one
    (moved aside, not deleted) is restored; only on success is the previous one removed."""
    old = _move_aside(final) if final.exists() else None
    try:
        _put_in_place(tmp, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)
        raise
    try:
        yield
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        _drop_backup(old)
    fsync_dir(final.parent)


def publish(
    cfg: ExperimentConfig,
    final: Path,
    started: float,
    *,
    write_files: Callable[[Path], list[str]],
    inputs: dict[str, str],
    metrics: dict[str, Any],
    run: dict[str, Any],
    rows: list[dict[str, Any]],
    digest_of: str,
) -> tuple[list[str], str, int]:
    """Write the results folder beside `final` (`write_files(tmp)` returns the relative file
    names), its manifest last, then put it in place and record the store rows in one step
    (`published`), all under the name's lock. Returns (relative file names, sha256 of
    `digest_of`, store rows)."""
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    study = cfg.study_digest()
    owner_check(final)  # before the lock file: a refused folder's parent gets nothing new
    with ResultsStore(cfg.store_url) as store, publish_lock(root, final.name):  # schema checked first
        recover(root, final.name, store)
        existing = owner_check(final)
        if existing is not None and existing != study:
            keep_aside(final, existing)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
        try:
            rel_files = write_files(tmp)
            owner = {"run_name": final.name, "run_id": run["run_id"], "study_digest": study}
            manifest, _ = write_manifest(
                tmp,
                stage=STAGE,
                config=cfg.model_dump(mode="json"),
                inputs=inputs,
                outputs=rel_files,
                metrics={**metrics, RESULTS_OF: owner},
                wall_time_s=time.time() - started,
                provenance=provenance(),
            )
            digest = hashlib.sha256((tmp / digest_of).read_bytes()).hexdigest()
            stamped = {**run, "created_at": dt.datetime.fromtimestamp(manifest.created_at, dt.UTC)}
            with published(tmp, final):
                n_rows = store.record_run(stamped, rows)  # one transaction
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already unless something failed before the rename
    return rel_files, digest, n_rows


def earlier_runs(cfg: ExperimentConfig, final: Path) -> list[str]:
    """Other results folders of the same study (its default names with another digest) or of the
    same run name (kept aside by `keep_aside`) beside `final`, newest first: what the run prints
    so a researcher sees the runs it did not replace."""
    found = {}
    for prefix in {cfg.study_name, final.name}:
        for folder in final.parent.glob(f"{glob.escape(prefix)}-*"):
            manifest = _manifest(folder) if folder != final and folder.is_dir() else None
            if manifest is not None and manifest.stage == STAGE and RESULTS_OF in manifest.metrics:
                found[folder.name] = manifest.created_at
    return sorted(found, key=lambda name: found[name], reverse=True)
