"""Where stages run: Prefect task runners by profile.

- `local`: in-process, one stage at a time (tests, `make demo`). Not threads in parallel on purpose:
  `torch.nn.utils.parametrize.cached()` is process-global, so a stage training the constrained
  arm in one thread makes another thread's weight reads cached too, and they can come back stale
  (a freed module's id reused by another module reads the other's cached weight).
- `dask-local`: prefect-dask's `DaskTaskRunner` on a `distributed.LocalCluster` of single-threaded
  processes: stages 2||3, 5||6 and seeds really run in parallel.
- `slurm`: a dask-jobqueue `SLURMCluster`. One GPU per worker job (`--gres=gpu:<type>:<n>`), and
  each worker advertises a `GPU=1` resource so GPU stages never share a worker, while CPU-light
  stages (0 download, 7 aggregate) carry no resource and do not wait for a GPU. Workers get
  `--lifetime` a little under the walltime so they drain before SLURM kills them, and the cluster
  scales adaptively between `min_workers` and `max_workers`. The runner (`infra/slurm_runner.py`)
  fails the flow with sbatch's message when no worker can ever start, and keeps workers' logs.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from monolm.config import ExperimentConfig, SlurmConfig
from monolm.study.registry import GPU_STAGES


def _minutes(walltime: str) -> int:
    """SLURM walltime `[D-]HH:MM[:SS]` or `MM` -> minutes."""
    days = 0
    if "-" in walltime:
        d, walltime = walltime.split("-", 1)
        days = int(d)
    parts = [int(p) for p in walltime.split(":")]
    if len(parts) == 1:
        h, m = 0, parts[0]
    else:
        h, m = parts[0], parts[1]
    return days * 1440 + h * 60 + m


def slurm_cluster_kwargs(slurm: SlurmConfig, api_url: str | None = None) -> dict[str, Any]:
    """Keyword arguments for `dask_jobqueue.SLURMCluster`, all from config."""
    lifetime = max(_minutes(slurm.walltime) - slurm.lifetime_margin_minutes, 1)
    stagger = max(min(slurm.lifetime_margin_minutes // 2, 5), 1)
    prologue = list(slurm.prologue)
    api_url = api_url or os.environ.get("PREFECT_API_URL")
    if api_url:
        prologue.append(f"export PREFECT_API_URL={shlex.quote(api_url)}")
    extra = [f"--gres=gpu:{slurm.gpu_type}:{slurm.gpus_per_job}", *slurm.job_extra_directives]
    if slurm.qos:
        extra.append(f"--qos={slurm.qos}")
    kwargs: dict[str, Any] = {
        "queue": slurm.partition,
        "account": slurm.account,
        "cores": slurm.cores,
        "processes": 1,  # one worker process per job, owning the job's GPU
        "memory": slurm.memory,
        "walltime": slurm.walltime,
        "job_extra_directives": extra,
        "job_directives_skip": list(slurm.job_directives_skip),
        "job_script_prologue": prologue,
        "worker_extra_args": [
            "--resources",
            f"GPU={slurm.gpus_per_job}",
            "--lifetime",
            f"{lifetime}m",
            "--lifetime-stagger",
            f"{stagger}m",
        ],
        "python": slurm.python or sys.executable,
        # No dashboard; the scheduler's HTTP routes (health, metrics) on a loopback port only.
        "scheduler_options": dict(NO_DASHBOARD),
    }
    if slurm.interface:
        kwargs["interface"] = slurm.interface  # scheduler and workers (dask-jobqueue)
    if slurm.local_directory:
        kwargs["local_directory"] = slurm.local_directory
    if slurm.log_directory:
        kwargs["log_directory"] = slurm.log_directory
    return {k: v for k, v in kwargs.items() if v is not None}


# dask's scheduler always starts an HTTP server (health, metrics, and the dashboard unless
# `dashboard=False`); by default on 0.0.0.0:8787. Off, and on a random loopback port.
NO_DASHBOARD = {"dashboard": False, "dashboard_address": "127.0.0.1:0"}

DASK_LOG_LEVEL = "DASK_LOGGING__DISTRIBUTED"  # dask's own setting for its `distributed` loggers


def quiet_dask_logs(*, workers_too: bool) -> str:
    """Keep dask's warnings and errors on the console, not its INFO chatter.

    At INFO a LocalCluster prints ~35 lines per run (nannies and workers starting and closing,
    clients connecting) and, when workers close before the scheduler's stream, a harmless
    `CommClosedError` traceback after a successful run: they bury the stages' own lines. The
    level is dask's own setting, so `DASK_LOGGING__DISTRIBUTED=info` brings them back. With
    `workers_too` it is also put in the environment that a LocalCluster's worker processes inherit
    (they print to the same console); SLURM workers write to their job's log file, where dask's
    INFO lines (which worker, which scheduler) are what a user debugging a job looks for, so
    they keep dask's default there. Returns the level in force in this process."""
    level = os.environ.get(DASK_LOG_LEVEL, "warning")
    if not isinstance(logging.getLevelName(level.upper()), int):
        raise ValueError(f"{DASK_LOG_LEVEL}={level!r} is not a logging level (debug, info, warning, error)")
    if workers_too:
        os.environ.setdefault(DASK_LOG_LEVEL, level)
    logging.getLogger("distributed").setLevel(level.upper())  # this process imported dask already
    return level


def make_task_runner(cfg: ExperimentConfig):
    profile = cfg.runner.profile
    if profile == "local":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=1)
    quiet_dask_logs(workers_too=profile == "dask-local")
    from prefect_dask import DaskTaskRunner

    if profile == "dask-local":
        return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=local_cluster_kwargs(cfg))
    from infra.slurm_runner import SlurmTaskRunner

    slurm = cfg.runner.slurm
    return SlurmTaskRunner(
        cluster_kwargs={**slurm_cluster_kwargs(slurm, prefect_api_url()), "tls_directory": tls_directory(cfg)},
        adapt_kwargs={"minimum": slurm.min_workers, "maximum": slurm.max_workers},
    )


def local_cluster_kwargs(cfg: ExperimentConfig) -> dict[str, Any]:
    """`distributed.LocalCluster` for `dask-local`: processes on loopback only, mutual TLS with an
    in-memory key (`infra/dask_tls.py`), no dashboard."""
    from infra.dask_tls import temporary_security

    return {
        "n_workers": cfg.runner.dask_workers,
        "threads_per_worker": 1,
        "processes": True,
        "host": "127.0.0.1",
        "protocol": "tls://",
        "security": temporary_security(),
        "dashboard_address": None,
        "scheduler_kwargs": dict(NO_DASHBOARD),
        "env": flow_api_env(),  # the workers' environment (distributed's Nanny)
    }


def flow_api_env() -> dict[str, str]:
    """`PREFECT_API_URL` for dask-local's worker processes when the flow runs without a server.

    Then the flow talks to Prefect's temporary (ephemeral) server in its own process tree, and a
    worker process, seeing no API URL either, would start a temporary server of its own at its
    first task: one per worker, seconds each (a fully cached run took 52 s instead of 23 s), with
    task runs recorded in databases nobody reads, and servers still shutting down when the
    cluster closes ("Worker process still alive after 4.0 seconds, killing"). Pointing the
    workers at the flow's own temporary server avoids all three. With a configured API URL
    (environment or Prefect profile) workers inherit it: nothing to add."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return {}
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the process's one temporary server (a singleton)
    return {"PREFECT_API_URL": server.api_url} if server.running else {}


def tls_directory(cfg: ExperimentConfig) -> str:
    """Where the `slurm` profile writes its cluster's TLS key (absolute: worker jobs start
    elsewhere): `runner.slurm.tls_directory`, else `<runs_root>/.state/dask-tls`. Created (0700)
    or checked by the cluster when it starts, not here."""
    configured = cfg.runner.slurm.tls_directory
    if configured:
        return str(Path(configured).expanduser().resolve())
    return str(cfg.paths.runs_root.resolve() / ".state" / "dask-tls")


def prefect_api_url() -> str:
    """The API the flow itself talks to, which SLURM workers must report to as well. Read from
    Prefect's settings, not only the environment: a profile or a test harness sets it there.
    Without a server (ephemeral mode) workers have nothing to report to, so that is an error."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value() or os.environ.get("PREFECT_API_URL")
    if not url:
        raise RuntimeError(
            "the slurm profile needs a Prefect server that the compute nodes can reach: start one "
            "(`make serve`, or infra/server/prefect-server.sh start --host <address>) and set PREFECT_API_URL"
        )
    return url


def gpu_resources(cfg: ExperimentConfig, stage: str) -> dict[str, int] | None:
    """Dask resource annotation for a stage: GPU stages need a whole GPU worker on `slurm`."""
    if cfg.runner.profile == "slurm" and stage in GPU_STAGES:
        return {"GPU": 1}
    return None
