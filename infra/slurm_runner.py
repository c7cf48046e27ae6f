"""The `slurm` profile's task runner: dask-jobqueue's `SLURMCluster`, made to fail loudly and to
keep its workers' logs.

Two failure modes of the plain `DaskTaskRunner(cluster_class=SLURMCluster)` against a real SLURM:

- A failed `sbatch` (controller down, impossible `--gres`, unknown partition/account) is only
  logged. The failed job stays in the cluster's worker list, so adaptive scaling counts it as
  "starting" and never submits another one: the flow waits forever. The same happens when a job
  ends before its dask worker connects (wrong interpreter, a prologue that fails, a job cancelled
  while pending). `WatchedSLURMCluster` records every submission, and `SlurmTaskRunner.check_workers`
  (polled by the flow while it waits) raises `SlurmSubmitError` with the `sbatch` message (or
  `SlurmWorkerError` naming the dead jobs) once no worker is connected and no submitted job is
  still queued or running, i.e. once nothing can ever make progress. While another worker runs
  or a job is queued, a failure is only reported (a busy cluster may queue jobs for hours).
- A job that asks for more than any node of its partition offers is not refused by `sbatch`:
  it stays pending (`PartitionConfig`) for ever. `check_workers` logs every pending job's reason
  once a minute and fails the flow with `SlurmPendingError` when no worker is connected and
  every pending job waits for something waiting cannot bring (`infra/slurm_queue.py`).
- Task logs that Prefect's API log handler had batched on a worker are lost when the cluster
  shuts down at flow end: the handler sends every
  `PREFECT_LOGGING_TO_API_BATCH_INTERVAL` seconds from a background thread, and the worker
  process is gone before the next batch. The runner drains that queue on every worker before
  teardown, and a worker plugin drains it whenever a worker closes (adaptive scale-down,
  `--lifetime`). dask closes a retired worker's job right after retiring it, and the `scancel`
  SIGTERM would kill the worker mid-drain, so a retired worker's job gets a few seconds to end
  by itself first.

The cluster speaks mutual TLS, with a key written for it into a private folder that the worker
jobs read (`infra/dask_tls.py`); its scheduler has no dashboard.

Also installed on every worker: Prefect's task timeouts made to hold in worker threads
(`install_persistent_task_timeouts`), and the flow uses stage locks that die with their holder
(`tasks/locks.py`), so a cancelled worker job does not leave its stage locked forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dask_jobqueue import SLURMCluster
from dask_jobqueue.slurm import SLURMJob
from distributed.core import Status
from distributed.diagnostics.plugin import WorkerPlugin
from prefect_dask import DaskTaskRunner

from infra.dask_tls import file_security, remove_tls_folder
from monolm.core.private import make_private_dirs

log = logging.getLogger("monolm.slurm")

# squeue states in which a job may still start (or already runs) a worker.
ALIVE_STATES = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "REQUEUED",
        "REQUEUE_HOLD",
        "REQUEUE_FED",
        "RESIZING",
        "SUSPENDED",
        "SIGNALING",
        "STAGE_OUT",
    }
)
FLUSH_TIMEOUT_S = 10.0
# How long a retired worker's job may take to end by itself before it is cancelled (~3 s seen:
# the nanny closes gracefully, then the job script ends).
RETIRE_GRACE_S = 10.0
# Pending worker jobs: how often squeue/sinfo are asked (not at every poll: a long queue wait must
# not load the controller), how often each job's reason is logged, and how long a reason that
# cannot resolve by waiting must persist before the flow fails (SLURM sets a job's reason at its
# next scheduling pass, so the first look may say "None").
PENDING_CHECK_S = 10.0
PENDING_LOG_INTERVAL_S = 60.0
HOPELESS_GRACE_S = 15.0


class SlurmSubmitError(RuntimeError):
    """`sbatch` failed and no worker is left that could run the remaining stages."""


class SlurmWorkerError(RuntimeError):
    """Worker jobs ended before their dask worker connected, and none is left."""


class SlurmPendingError(RuntimeError):
    """Worker jobs are pending for a reason waiting cannot resolve, and no worker is connected."""


@dataclass
class SubmitFailure:
    worker: str
    message: str
    at: float


@dataclass
class SubmitWatch:
    """What happened to each worker job of one cluster: submitted (job id), failed to submit
    (the `sbatch` message), connected to the scheduler. Written from the cluster's event loop,
    read from the flow's thread."""

    submitted: dict[str, str] = field(default_factory=dict)
    failures: list[SubmitFailure] = field(default_factory=list)
    connected: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record_submitted(self, worker: str, job_id: str) -> None:
        with self.lock:
            self.submitted[worker] = job_id
            # dask-jobqueue reuses a lost worker's name for its replacement: not connected yet.
            self.connected.discard(worker)

    def record_failure(self, worker: str, message: str) -> None:
        with self.lock:
            self.failures.append(SubmitFailure(worker, message, time.time()))

    def record_connected(self, worker: str) -> None:
        with self.lock:
            self.connected.add(worker)

    def snapshot(self) -> tuple[dict[str, str], list[SubmitFailure]]:
        """(jobs whose worker never connected: name -> job id, submission failures)."""
        with self.lock:
            waiting = {w: j for w, j in self.submitted.items() if w not in self.connected}
            return waiting, list(self.failures)


def sbatch_message(exc: BaseException) -> str:
    """The useful part of dask-jobqueue's 'Command exited with non-zero exit code' error: the
    command's stderr (e.g. 'sbatch: error: Batch job submission failed: Requested node
    configuration is not available'), else the whole message."""
    text = str(exc)
    if "stderr:" in text:
        stderr = text.split("stderr:", 1)[1].strip()
        if stderr:
            return stderr
    return text.strip() or type(exc).__name__


class WatchedSLURMJob(SLURMJob):
    """A `SLURMJob` that reports the outcome of its `sbatch` to the cluster's `SubmitWatch`."""

    def __init__(self, *args: Any, submit_watch: SubmitWatch | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.submit_watch = submit_watch

    async def start(self) -> None:
        try:
            await super().start()
        except Exception as exc:
            # "failed", not "created": SpecCluster's close asserts every job it made was started
            # or failed, and that AssertionError would hide the sbatch error.
            self.status = Status.failed
            if self.submit_watch is not None:
                self.submit_watch.record_failure(str(self.name), sbatch_message(exc))
            raise
        if self.submit_watch is not None:
            self.submit_watch.record_submitted(str(self.name), str(self.job_id))

    async def close(self) -> None:
        """Let a retired worker's job end by itself before `scancel`ing it. dask retires a worker
        (adaptive scale-down, cluster close) and then closes its job at once; the `scancel`
        SIGTERM arrived ~5 ms after the worker began to close and killed it while its plugins'
        teardown was still sending the Prefect log lines it held (seen: a stage's last lines
        lost). A connected worker that was retired exits within a second or so; one that never
        connected (still queued) is cancelled at once."""
        watch = self.submit_watch
        if self.job_id and watch is not None and str(self.name) in watch.connected and not await self._connected():
            deadline = time.monotonic() + RETIRE_GRACE_S
            while time.monotonic() < deadline and await self._job_active():
                await asyncio.sleep(0.25)
        await super().close()

    async def _connected(self) -> bool:
        """Is this job's worker still connected to the scheduler (not retired: e.g. it held the
        only copy of a result at cluster close)? Then nothing is closing it gracefully: cancel."""
        ref = getattr(self, "_cluster", None)
        cluster = ref() if ref is not None else None
        comm = getattr(cluster, "scheduler_comm", None)
        if comm is None:
            return False
        try:
            info = await asyncio.wait_for(comm.identity(), 10)
        except Exception:
            return False
        return any(w.get("name") == self.name for w in info.get("workers", {}).values())

    async def _job_active(self) -> bool:
        try:
            out = await self._call(["squeue", "-h", "-j", str(self.job_id), "-o", "%T"])
        except Exception:  # unknown to squeue (long gone) or squeue failing: stop waiting
            return False
        return out.strip() in ALIVE_STATES


class WatchedSLURMCluster(SLURMCluster):
    """`SLURMCluster` whose jobs report submissions and failures, and which notes every worker
    that ever connected (a retired worker's job ends normally; one that never connected did not)."""

    job_cls = WatchedSLURMJob

    def __init__(self, *args: Any, tls_directory: str | None = None, **kwargs: Any):
        """`tls_directory`: a private folder on the shared filesystem; the cluster then speaks
        mutual TLS only, with a key of its own written there and removed at close
        (`infra/dask_tls.py`)."""
        self.submit_watch = SubmitWatch()
        self.tls_folder: Path | None = None
        if kwargs.get("log_directory"):  # dask-jobqueue would create it with the umask
            make_private_dirs(kwargs["log_directory"])
        if tls_directory is not None and kwargs.get("security") is None:
            kwargs["security"], self.tls_folder = file_security(tls_directory)
            kwargs["protocol"] = "tls://"
        try:
            super().__init__(*args, submit_watch=self.submit_watch, **kwargs)
        except BaseException:
            remove_tls_folder(self.tls_folder)
            raise

    async def _close(self) -> None:
        try:
            await super()._close()
        finally:
            remove_tls_folder(self.tls_folder)

    def _update_worker_status(self, op: str, msg: Any) -> None:
        # distributed's hook for scheduler "add"/"remove" worker events (Cluster base class).
        if op == "add" and isinstance(msg, dict):
            for info in (msg.get("workers") or {}).values():
                if info.get("name") is not None:
                    self.submit_watch.record_connected(str(info["name"]))
        super()._update_worker_status(op, msg)


def squeue_states(job_ids: list[str]) -> dict[str, str] | None:
    """job id -> SLURM state (jobs that left squeue's memory are absent); None if squeue failed."""
    if not job_ids:
        return {}
    try:
        proc = subprocess.run(
            ["squeue", "-h", "--states=all", "-j", ",".join(job_ids), "-o", "%i %T"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        # Every id unknown (all long gone) is an error for squeue, not an empty list.
        return {} if "Invalid job id" in proc.stderr else None
    states: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    return states


async def drain_prefect_logs(at_exit: bool = False) -> bool:
    """Send every log record this process's Prefect API log handler still holds (runs on a
    worker, in its event loop)."""
    from prefect.logging.handlers import APILogWorker

    pending = APILogWorker.drain_all(timeout=FLUSH_TIMEOUT_S, at_exit=at_exit)
    if inspect.isawaitable(pending):
        await pending
    return True


class FlushPrefectLogsOnClose(WorkerPlugin):
    """Drain a worker's Prefect log queue when the worker closes (scale-down, lifetime, teardown)."""

    name = "monolm-flush-prefect-logs"

    async def teardown(self, worker: Any) -> None:
        with contextlib.suppress(Exception):  # never block a worker's shutdown on the API
            await asyncio.wait_for(drain_prefect_logs(at_exit=True), FLUSH_TIMEOUT_S + 5)


def install_persistent_task_timeouts(resend_seconds: float = 2.0) -> bool:
    """Make Prefect's task timeouts hold in worker threads. A sync task in a thread times out by
    an exception Prefect injects into that thread, once. On a dask worker that exception
    sometimes landed in distributed's garbage-collector callback, where Python prints "Exception
    ignored in: GCDiagnosis._gc_callback ... CancelledError" and drops it: the timed-out stage then
    ran on to its end (seen: a 0.3 s timeout honoured on the first attempt, ignored on the retry).
    Patched: keep injecting every `resend_seconds` until the timed-out scope has exited. Returns
    whether it patched (False: already patched, or Prefect's internals changed and it could not).
    """
    try:
        from prefect._internal.concurrency.cancellation import WatcherThreadCancelScope
    except ImportError:  # pragma: no cover - a Prefect without this class
        return False
    original = WatcherThreadCancelScope._send_cancelled_error
    if getattr(original, "_monolm_persistent", False):
        return False
    if not all(hasattr(WatcherThreadCancelScope, a) for a in ("_timeout_enforcer", "cancel")):
        return False  # pragma: no cover

    def send_until_exited(self) -> None:
        while True:
            original(self)
            # `_event` is set when the supervised thread leaves the scope.
            if self._event.wait(resend_seconds) or getattr(self, "_exited", True):
                return

    send_until_exited._monolm_persistent = True  # type: ignore[attr-defined]
    WatcherThreadCancelScope._send_cancelled_error = send_until_exited
    return True


class PersistentTaskTimeouts(WorkerPlugin):
    """Installs `install_persistent_task_timeouts` in every worker process."""

    name = "monolm-persistent-task-timeouts"

    def setup(self, worker: Any) -> None:
        install_persistent_task_timeouts()


class SlurmTaskRunner(DaskTaskRunner):
    """`DaskTaskRunner` on a `WatchedSLURMCluster`: see the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("cluster_class", WatchedSLURMCluster)
        super().__init__(*args, **kwargs)
        self._reported: set[str] = set()
        self._pending_checked = -float("inf")
        self._pending_logged: dict[str, float] = {}
        self._hopeless_since: dict[str, float] = {}

    @property
    def client(self):
        fresh = self._client is None
        client = super().client
        if fresh:
            client.register_plugin(FlushPrefectLogsOnClose(), name=FlushPrefectLogsOnClose.name)
            client.register_plugin(PersistentTaskTimeouts(), name=PersistentTaskTimeouts.name)
        return client

    @property
    def cluster(self) -> WatchedSLURMCluster | None:
        cluster = self._cluster
        return cluster if isinstance(cluster, WatchedSLURMCluster) else None

    def check_workers(
        self, warn: Callable[[str], None] | None = None, info: Callable[[str], None] | None = None
    ) -> None:
        """Raise if the cluster can no longer run anything: no worker connected, no job queued or
        running, and at least one submission failed (`SlurmSubmitError`, with sbatch's message) or
        ended before its worker connected (`SlurmWorkerError`); or every worker job is pending
        for a reason waiting cannot resolve (`SlurmPendingError`, see `infra/slurm_queue.py`).
        `warn` receives each submission failure once, `info` each pending job's reason once a
        minute (the flow passes its run logger)."""
        cluster = self.cluster
        if cluster is None:
            return
        waiting, failures = cluster.submit_watch.snapshot()
        for failure in failures:
            self._report(f"worker job {failure.worker}: sbatch failed: {failure.message}", warn)
        connected = bool(cluster.scheduler_info.get("workers"))
        if waiting:
            self.watch_pending(waiting, connected, info)
        if connected:
            return
        if not failures and not waiting:
            return
        states = squeue_states(sorted(set(waiting.values())))
        if states is None:  # cannot tell what the queue holds
            if failures:
                raise SlurmSubmitError(self._submit_message(failures))
            return
        if any(states.get(job) in ALIVE_STATES for job in waiting.values()):
            return  # queued or starting: waiting for SLURM is legitimate
        if failures:
            raise SlurmSubmitError(self._submit_message(failures))
        dead = ", ".join(
            f"job {job} ({states.get(job, 'no longer known to SLURM')})" for _, job in sorted(waiting.items())
        )
        raise SlurmWorkerError(
            f"SLURM worker jobs ended before their dask worker connected to the scheduler: {dead}. "
            "Check the jobs' output (runner.slurm.log_directory), the interpreter (runner.slurm.python) "
            "and the prologue (runner.slurm.prologue)."
        )

    def watch_pending(
        self, waiting: dict[str, str], connected: bool, info: Callable[[str], None] | None = None
    ) -> None:
        """Log each pending worker job's reason once a minute; raise `SlurmPendingError` once no
        worker is connected and every pending job has waited `HOPELESS_GRACE_S` for a reason
        that cannot resolve, while no other job of the runner is starting. At most one squeue
        and one sinfo call per partition every `PENDING_CHECK_S`."""
        from infra.slurm_queue import diagnose, partition_nodes, pending_jobs

        now = time.monotonic()
        if now - self._pending_checked < PENDING_CHECK_S:
            return
        self._pending_checked = now
        jobs = pending_jobs(sorted(set(waiting.values())))
        if jobs is None:  # squeue failed: check_workers decides what that means
            return
        nodes = {p: partition_nodes(p) for p in {job.partition for job in jobs}}
        hopeless: dict[str, str] = {}
        for job in jobs:
            why = diagnose(job, nodes[job.partition])
            if now - self._pending_logged.get(job.job_id, -float("inf")) >= PENDING_LOG_INTERVAL_S:
                self._pending_logged[job.job_id] = now
                line = f"worker job {job.job_id} pending ({job.reason}): requests {job.request()}"
                (info or self.logger.info)(line + (f"; waiting cannot help: {why}" if why else ""))
            if why:
                hopeless[job.job_id] = why
                self._hopeless_since.setdefault(job.job_id, now)
            else:
                self._hopeless_since.pop(job.job_id, None)
        starting = set(waiting.values()) - {job.job_id for job in jobs}  # running, or just submitted
        states = squeue_states(sorted(starting)) if starting else {}
        if states and any(states.get(j) in ALIVE_STATES for j in starting):
            return
        if connected or not jobs or len(hopeless) < len(jobs):
            return
        if all(now - self._hopeless_since[j] >= HOPELESS_GRACE_S for j in hopeless):
            job = next(j for j in jobs if j.job_id in hopeless)
            raise SlurmPendingError(
                f"SLURM worker job {job.job_id} cannot start and waiting will not help (pending, reason "
                f"{job.reason}): {hopeless[job.job_id]}. Lower runner.slurm.cores / memory / gpus_per_job or "
                "choose another runner.slurm.partition (the local cluster of infra/slurm/local-slurm.sh: "
                "--config infra/slurm/site-local.yaml)."
                + (f" {len(jobs) - 1} more worker job(s) wait for the same." if len(jobs) > 1 else "")
            )

    @staticmethod
    def _submit_message(failures: list[SubmitFailure]) -> str:
        last = failures[-1]
        return (
            f"SLURM job submission failed ({len(failures)} sbatch failure(s), no worker left to run "
            f"the remaining stages): {last.message}"
        )

    def _report(self, message: str, warn: Callable[[str], None] | None) -> None:
        if message not in self._reported:
            self._reported.add(message)
            (warn or self.logger.warning)(message)

    def flush_worker_logs(self, timeout: float = FLUSH_TIMEOUT_S + 5) -> None:
        """Drain every connected worker's Prefect log queue (bounded: a dead worker cannot hold
        up the flow's teardown)."""
        client = self._client
        if client is None or client.status not in ("running", "connecting"):
            return

        def run() -> None:
            try:
                client.run(drain_prefect_logs, on_error="ignore")
            except Exception as exc:  # pragma: no cover - best effort
                log.warning("could not flush worker logs: %s", exc)

        thread = threading.Thread(target=run, name="monolm-flush-worker-logs", daemon=True)
        thread.start()
        thread.join(timeout)

    def __exit__(self, *args: Any) -> None:
        self.flush_worker_logs()
        super().__exit__(*args)
