"""Stage locks die with their holder (tasks/locks.py): a process SIGKILLed while holding a stage's
lock (a cancelled SLURM job, the OOM killer) does not leave every later attempt waiting forever,
as Prefect's own FileSystemLockManager does; live holders still exclude everyone else."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prefect.locking.filesystem import FileSystemLockManager

from tasks.locks import LivenessLockManager

REPO = Path(__file__).resolve().parents[1]

HOLDER = r"""
import sys, time
from tasks.locks import LivenessLockManager
manager = LivenessLockManager(sys.argv[1])
assert manager.acquire_lock(sys.argv[2], holder="child", acquire_timeout=30)
print("held", flush=True)
if sys.argv[3] == "release":
    sys.stdin.readline()
    manager.release_lock(sys.argv[2], holder="child")
    print("released", flush=True)
time.sleep(600)
"""

TRANSACTION = r"""
import sys, time
from prefect.filesystems import LocalFileSystem
from prefect.results import ResultStore
from prefect.transactions import IsolationLevel, transaction
from tasks.locks import LivenessLockManager
store = ResultStore(result_storage=LocalFileSystem(basepath=sys.argv[2]), lock_manager=LivenessLockManager(sys.argv[1]))
with transaction(key=sys.argv[3], store=store, isolation_level=IsolationLevel.SERIALIZABLE):
    print("in transaction", flush=True)
    time.sleep(600)
"""


def start(script: str, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise AssertionError(f"holder process failed: {proc.stderr.read()}")
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    proc.stdout.close()
    proc.stderr.close()
    if proc.stdin:
        proc.stdin.close()


def test_lock_of_a_killed_holder_is_taken_over_at_once(tmp_path):
    locks = tmp_path / "locks"
    proc = start(HOLDER, str(locks), "train_monotonic-abc", "hold")
    try:
        manager = LivenessLockManager(locks)
        assert manager.is_locked("train_monotonic-abc")
        assert not manager.acquire_lock("train_monotonic-abc", holder="me", acquire_timeout=0.3)
        assert not manager.is_lock_holder("train_monotonic-abc", "me")
    finally:
        kill(proc)
    # Prefect's own manager would wait for this file forever; ours sees its holder is gone.
    assert (locks / "train_monotonic-abc.lock").exists()
    assert FileSystemLockManager(locks).is_locked("train_monotonic-abc")
    t0 = time.monotonic()
    assert not manager.is_locked("train_monotonic-abc")
    assert manager.acquire_lock("train_monotonic-abc", holder="me", acquire_timeout=5)
    assert time.monotonic() - t0 < 1
    assert manager.is_lock_holder("train_monotonic-abc", "me")
    # The file says who holds it now (for whoever looks), in Prefect's format plus host/pid.
    assert FileSystemLockManager(locks)._get_lock_info("train_monotonic-abc", use_cache=False)["holder"] == "me"
    manager.release_lock("train_monotonic-abc", holder="me")
    assert not (locks / "train_monotonic-abc.lock").exists() and not manager.is_locked("train_monotonic-abc")


def test_live_holder_in_another_process_excludes_until_it_releases(tmp_path):
    locks = tmp_path / "locks"
    proc = start(HOLDER, str(locks), "uat-1", "release")
    manager = LivenessLockManager(locks, poll_seconds=0.02)
    try:
        got: list[float] = []
        waiter = threading.Thread(
            target=lambda: got.append(manager.acquire_lock("uat-1", holder="w") and time.monotonic())
        )
        waiter.start()
        time.sleep(0.5)
        assert not got and manager.is_locked("uat-1")  # still waiting behind the live holder
        released_at = time.monotonic()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "released"
        waiter.join(10)
        assert got and got[0] >= released_at
        with pytest.raises(ValueError):
            manager.release_lock("uat-1", holder="someone-else")
        manager.release_lock("uat-1", holder="w")
    finally:
        kill(proc)


def test_threads_of_one_process_wait_for_each_other(tmp_path):
    a, b = LivenessLockManager(tmp_path, poll_seconds=0.01), LivenessLockManager(tmp_path, poll_seconds=0.01)
    assert a.acquire_lock("k", holder="first")
    assert a.acquire_lock("k", holder="first", acquire_timeout=0)  # re-entrant for its holder
    assert not b.acquire_lock("k", holder="second", acquire_timeout=0.2)
    assert b.is_locked("k") and not b.is_lock_holder("k", "second")
    order: list[str] = []
    t = threading.Thread(target=lambda: (b.acquire_lock("k", holder="second"), order.append("second")))
    t.start()
    time.sleep(0.2)
    order.append("first releases")
    a.release_lock("k", holder="first")
    t.join(5)
    assert order == ["first releases", "second"]
    b.release_lock("k", holder="second")


def test_hold_timeout_expires_a_live_holders_lock(tmp_path):
    """Prefect's `hold_timeout` semantics are kept: an expired lock is free even if its holder lives."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            HOLDER.replace(
                'holder="child", acquire_timeout=30', 'holder="child", acquire_timeout=30, hold_timeout=0.5'
            ),
            str(tmp_path),
            "k",
            "hold",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "held", proc.stderr.read()
        manager = LivenessLockManager(tmp_path, poll_seconds=0.05)
        assert manager.is_locked("k")
        assert manager.acquire_lock("k", holder="me", acquire_timeout=10)
        manager.release_lock("k", holder="me")
    finally:
        kill(proc)


def test_prefect_serializable_transaction_of_a_killed_process_does_not_block(tmp_path):
    """The way stages use it: a SERIALIZABLE Prefect transaction whose process is killed inside it."""
    from prefect.filesystems import LocalFileSystem
    from prefect.results import ResultStore
    from prefect.transactions import IsolationLevel, transaction

    locks, results = tmp_path / "locks", tmp_path / "results"
    proc = start(TRANSACTION, str(locks), str(results), "stage-key")
    kill(proc)
    store = ResultStore(result_storage=LocalFileSystem(basepath=str(results)), lock_manager=LivenessLockManager(locks))
    done = threading.Event()

    def enter() -> None:
        with transaction(key="stage-key", store=store, isolation_level=IsolationLevel.SERIALIZABLE):
            done.set()

    t = threading.Thread(target=enter, daemon=True)
    t.start()
    assert done.wait(10), "the transaction waited for the killed process's lock"
    t.join(10)
    assert not (locks / "stage-key.lock").exists()
    assert os.listdir(locks) == []
