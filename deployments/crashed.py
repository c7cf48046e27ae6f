"""Mark flow runs whose process died as Crashed.

    python -m deployments.crashed                 # once, for work pool `local`
    python -m deployments.crashed --dry-run       # only list them
    python -m deployments.crashed --watch 60      # every 60 s until interrupted

Why: a Prefect process worker reports a flow run as Crashed when the run's process exits badly,
but if the worker dies too (OOM killer, `kill -9` of a process group, a reboot), nobody is left
to report it: the server shows the run `Running` forever, its stage
task runs too, and the UI offers no Retry for a run that looks alive.

How a dead run is recognised: a process worker records the PID of each flow run's process as the
run's `infrastructure_pid`. For every `Pending`/`Running` flow run of the given work pools, the
helper checks that this PID is alive *and* is the same process: it must have started between the
run's creation and its start (a recycled PID belongs to a process started later). Run it on the
machine where the pools' workers run (a `process` pool runs flow runs on the worker's host). A run
without a recorded PID (not yet submitted) is left alone.

What is marked: the flow run, its sub-flow runs (the `experiment-stages` run) and their
`Pending`/`Running` task runs, children first. The transitions are proposed, not forced, so a run
that finished in the meantime keeps its real final state. A crashed run can then be retried from
the UI; finished stages are cache hits.

Uses only Prefect's client and the standard library (no monolm import).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

from infra.api_auth import use_served_auth

SLACK = dt.timedelta(seconds=2)  # /proc start times have 1 s resolution (boot time) plus clock skew
ACTIVE = ("PENDING", "RUNNING")


# --------------------------------------------------------------------------- processes
def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise RuntimeError("no btime in /proc/stat")


def process_started_at(pid: int) -> dt.datetime | None:
    """Wall-clock start of a live (non-zombie) process, or None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces
    if fields[0] in ("Z", "X"):
        return None
    ticks = int(fields[19])  # field 22: start time in clock ticks since boot
    seconds = _boot_time() + ticks / os.sysconf("SC_CLK_TCK")
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


def run_process_alive(pid: int, created: dt.datetime, started: dt.datetime | None) -> tuple[bool, str]:
    """Is `pid` the live process of a flow run created at `created` (and started at `started`)?"""
    began = process_started_at(pid)
    if began is None:
        return False, f"process {pid} is gone"
    latest = (started or dt.datetime.now(dt.UTC)) + SLACK
    if not created - SLACK <= began <= latest:
        return (
            False,
            f"process {pid} is gone (the PID now belongs to a process started at {began:%Y-%m-%d %H:%M:%S} UTC)",
        )
    return True, f"process {pid} is alive"


def parse_pid(infrastructure_pid: str | None) -> int | None:
    """A process worker stores the PID; some infrastructures store `host:pid`."""
    if not infrastructure_pid:
        return None
    tail = str(infrastructure_pid).rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else None


# --------------------------------------------------------------------------- finding and marking
@dataclass
class DeadRun:
    flow_run: Any
    pid: int
    reason: str
    subflow_runs: list[Any] = field(default_factory=list)
    task_runs: list[Any] = field(default_factory=list)
    outcome: str = "found"


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


async def find_dead_runs(client: Any, pools: Sequence[str]) -> list[DeadRun]:
    """Active flow runs of `pools` whose recorded process is not alive on this machine."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        WorkPoolFilter,
        WorkPoolFilterName,
    )

    runs = await client.read_flow_runs(
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=list(ACTIVE)))),
        work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=list(pools))),
    )
    dead = []
    for run in runs:
        pid = parse_pid(run.infrastructure_pid)
        if pid is None:
            continue  # not submitted yet, or an infrastructure without a local PID
        alive, reason = run_process_alive(pid, _utc(run.created), _utc(run.start_time))
        if not alive:
            dead.append(DeadRun(run, pid, reason))
    for item in dead:
        item.subflow_runs, item.task_runs = await _active_descendants(client, item.flow_run.id)
    return dead


async def _active_descendants(client: Any, root: UUID) -> tuple[list[Any], list[Any]]:
    """Active sub-flow runs (any depth, parents first) and active task runs of root and them."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        FlowRunFilterState,
        FlowRunFilterStateType,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )

    subflows: list[Any] = []
    frontier = [root]
    while frontier:
        children = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=list(ACTIVE))),
            )
        )
        children = [c for c in children if c.id not in {s.id for s in subflows}]
        subflows += children
        frontier = [c.id for c in children]
    task_runs = await client.read_task_runs(
        task_run_filter=TaskRunFilter(
            flow_run_id=TaskRunFilterFlowRunId(any_=[root, *(s.id for s in subflows)]),
            state=TaskRunFilterState(type=TaskRunFilterStateType(any_=list(ACTIVE))),
        )
    )
    return subflows, task_runs


async def mark_crashed(client: Any, dead: Sequence[DeadRun]) -> None:
    """Propose Crashed for task runs, then sub-flow runs (deepest first), then the flow run."""
    from prefect.states import Crashed

    host = socket.gethostname()
    for item in dead:
        message = (
            f"{item.reason} on {host}: the flow run's process died without reporting a final state "
            "(marked Crashed by deployments.crashed). Retry it to resume from the cached stages."
        )
        for task_run in item.task_runs:
            await client.set_task_run_state(task_run.id, Crashed(message=message))
        for sub in reversed(item.subflow_runs):
            await client.set_flow_run_state(sub.id, Crashed(message=message))
        result = await client.set_flow_run_state(item.flow_run.id, Crashed(message=message))
        item.outcome = (
            "marked Crashed"
            if result.state and result.state.is_crashed()
            else f"not changed ({result.status.value}: {getattr(result.details, 'reason', '')})"
        )


async def sweep(pools: Sequence[str], dry_run: bool = False, client: Any = None) -> list[DeadRun]:
    """Find (and unless `dry_run`, mark) the dead runs of `pools` once."""
    from prefect.client.orchestration import get_client

    if client is None:
        async with get_client() as own:
            return await sweep(pools, dry_run, own)
    dead = await find_dead_runs(client, pools)
    if not dry_run:
        await mark_crashed(client, dead)
    return dead


def describe(item: DeadRun) -> str:
    run = item.flow_run
    return (
        f"{item.outcome}: flow run '{run.name}' ({run.id}, {run.state_name}); {item.reason}; "
        f"{len(item.subflow_runs)} sub-flow run(s), {len(item.task_runs)} task run(s)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deployments.crashed",
        description="Mark flow runs whose process died (stuck Pending/Running) as Crashed.",
    )
    parser.add_argument(
        "--pool",
        action="append",
        dest="pools",
        help="work pool whose worker runs on this machine (repeatable; default: local)",
    )
    parser.add_argument("--dry-run", action="store_true", help="list the dead runs, change nothing")
    parser.add_argument("--watch", type=float, metavar="SECONDS", help="repeat every SECONDS until interrupted")
    args = parser.parse_args(argv)
    use_served_auth()  # the server `make serve` started requires its auth string (before Prefect loads)
    if not os.environ.get("PREFECT_API_URL"):
        print(
            "PREFECT_API_URL is not set (export PREFECT_API_URL=$(infra/server/prefect-server.sh url))", file=sys.stderr
        )
        return 2
    pools = args.pools or ["local"]
    while True:
        dead = asyncio.run(sweep(pools, dry_run=args.dry_run))
        for item in dead:
            print(describe(item), flush=True)
        if not dead and not args.watch:
            print(f"no dead flow runs in work pool(s) {', '.join(pools)}")
        if not args.watch:
            return 0
        time.sleep(args.watch)


if __name__ == "__main__":
    sys.exit(main())
