"""Stage locks that die with the process holding them.

Stages run with Prefect's SERIALIZABLE isolation: an attempt takes a lock named by the stage's
cache key, so a second run of the same stage (another flow on the same seed) waits and then
reuses the result. Prefect's `FileSystemLockManager` writes `<key>.lock` and deletes it on
release. A holder that is killed (a `scancel`ed SLURM worker job, the OOM killer, the walltime,
SIGKILL) never releases; the file has no expiry, so every later attempt of that stage (dask
rescheduling it on another worker, Prefect's retry, the next flow run) waits for it forever.
Seen here: a worker job cancelled mid-training left the stage's lock behind and the flow hung.

`LivenessLockManager` keeps Prefect's lock files (same directory, names and JSON, plus host/pid
for whoever looks) and also holds an exclusive `flock` on the file for as long as the lock is
held. The kernel drops a flock when its process dies, however it dies, so a lock file that nobody
holds a flock on is stale and the next attempt takes it over. flock is honoured across machines
on the shared filesystems that hold `paths.runs_root` on a cluster (NFSv4 maps it to byte-range
locks). Inside one process a registry makes threads wait for each other, because an emulated
flock would not, and because a probe there must never close a descriptor the holder relies on.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path

import anyio
from prefect.locking.filesystem import FileSystemLockManager

# lock file path -> (holder, descriptor holding the flock), for locks held by this process.
_held: dict[str, tuple[str, int]] = {}
_registry = threading.Lock()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _expired(fd: int) -> bool:
    """Whether the lock file's recorded `expiration` (Prefect's hold_timeout) has passed."""
    try:
        info = json.loads(os.pread(fd, 65536, 0) or b"{}")
        expiration = info.get("expiration")
        return expiration is not None and dt.datetime.fromisoformat(expiration) < _now()
    except (OSError, ValueError):
        return False


class LivenessLockManager(FileSystemLockManager):
    """A `FileSystemLockManager` whose locks are released when their holder process dies."""

    def __init__(self, lock_files_directory: str | Path, poll_seconds: float = 0.1):
        super().__init__(Path(lock_files_directory))
        self.poll_seconds = poll_seconds

    def _path(self, key: str) -> str:
        return str(self.lock_files_directory.joinpath(key).with_suffix(".lock"))

    # ------------------------------------------------------------------ taking and releasing
    def _try_take(self, key: str, holder: str, hold_timeout: float | None) -> bool:
        path = self._path(key)
        with _registry:
            mine = _held.get(path)
            if mine is not None:
                return mine[0] == holder  # re-entrant for its holder; other threads of this process wait
            self._ensure_lock_files_directory_exists()
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # holder and host/pid: for this user only
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                # A live holder elsewhere, unless its own hold_timeout ran out: then break it (the
                # old holder keeps a flock on a file nobody can find any more).
                if _expired(fd):
                    self._unlink_if_same(path, fd)
                os.close(fd)
                return False
            # Released (unlinked) between our open and our flock: we hold an orphan; try again.
            if not self._is_current(path, fd):
                os.close(fd)
                return False
            expiration = None if hold_timeout is None else (_now() + dt.timedelta(seconds=hold_timeout)).isoformat()
            record = {
                "holder": holder,
                "expiration": expiration,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
            _held[path] = (holder, fd)
            return True

    @staticmethod
    def _is_current(path: str, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            return False

    def _unlink_if_same(self, path: str, fd: int) -> None:
        if self._is_current(path, fd):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def acquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        """Take the lock, waiting up to `acquire_timeout` seconds (None: as long as it takes; a
        dead holder's lock is taken over at once)."""
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        while not self._try_take(key, holder, hold_timeout):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(self.poll_seconds)
        return True

    async def aacquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        while not self._try_take(key, holder, hold_timeout):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await anyio.sleep(self.poll_seconds)
        return True

    def release_lock(self, key: str, holder: str) -> None:
        path = self._path(key)
        with _registry:
            mine = _held.get(path)
            if mine is None or mine[0] != holder:
                raise ValueError(f"No lock held by {holder} for transaction with key {key}")
            del _held[path]
            fd = mine[1]
            # Unlink while still holding the flock, so a waiter that opened this file sees it gone.
            self._unlink_if_same(path, fd)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    # ------------------------------------------------------------------ queries
    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        path = self._path(key)
        with _registry:
            if path in _held:
                return True
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return not _expired(fd)  # held by a live process
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False  # a lock file nobody holds: its holder died
        finally:
            os.close(fd)

    def is_lock_holder(self, key: str, holder: str) -> bool:
        with _registry:
            mine = _held.get(self._path(key))
        return mine is not None and mine[0] == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(self.poll_seconds)
        return True

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await anyio.sleep(self.poll_seconds)
        return True
