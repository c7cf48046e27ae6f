"""`monolm runs` (and `make status`): the latest runs of the `experiment` flow with their state in
full (Completed, Failed, Crashed, Scheduled, ...), the deployment that started them, when, how
long, and why a run failed; `prefect flow-run ls` cuts its State column in a narrow terminal.

Which server: `PREFECT_API_URL`, else the one `make serve` started (`<state>/prefect/api_url`,
if it answers), else the project-local run history that `monolm run` writes (`.state/prefect`,
read through a temporary server)."""

from __future__ import annotations

import asyncio
import os
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

FLOW = "experiment"
MESSAGE_CHARS = 80


def served_api_url(state_dir: Path | None = None) -> str | None:
    """The API of the server `make serve` started, when it answers its health check."""
    state = state_dir or Path(os.environ.get("MONOLM_STATE_DIR") or ".state")
    path = state / "prefect" / "api_url"
    if not path.is_file():
        return None
    url = path.read_text().strip()
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=3) as resp:
            return url if resp.status == 200 else None
    except OSError:
        return None


def _when(run: Any) -> str:
    moment = run.start_time or run.expected_start_time
    return moment.astimezone().strftime("%Y-%m-%d %H:%M") if moment else "—"


def _duration(run: Any) -> str:
    seconds = run.total_run_time.total_seconds() if run.total_run_time else 0.0
    if not seconds:
        return "—"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _listed(values: Sequence[Any] | None) -> str:
    """A list parameter as the run got it; not given means the preset's own value."""
    return " ".join(map(str, values)) if values else "preset's"


def _grid(params: Mapping[str, Any]) -> str | None:
    """The grid axes a run was started with (models, variants, inits; `variant` is the one-variant
    form), or None for a run of the preset's single model, variant and init."""
    axes = {
        "models": params.get("models"),
        "variants": params.get("variants") or ([params["variant"]] if params.get("variant") else None),
        "inits": params.get("init"),
    }
    return "; ".join(f"{axis}: {' '.join(map(str, values))}" for axis, values in axes.items() if values) or None


def flow_run_rows(runs: Sequence[Any], deployments: Mapping[Any, str]) -> list[dict[str, Any]]:
    """One row per flow run, newest first as given: the state's full name, and the start of its
    message for a run that did not complete."""
    rows = []
    for run in runs:
        params = run.parameters or {}
        message = (run.state.message or "") if run.state and run.state_name != "Completed" else ""
        message = message.strip().splitlines()[0] if message.strip() else None
        rows.append(
            {
                "flow run": run.name,
                "deployment": deployments.get(run.deployment_id, "—") if run.deployment_id else "(monolm run)",
                "state": run.state_name or "—",
                "started / due": _when(run),
                "took": _duration(run),
                "preset": params.get("preset", "—"),
                "seeds": _listed(params.get("seeds")),
                "grid": _grid(params),
                "message": message and message[:MESSAGE_CHARS] + ("…" if len(message) > MESSAGE_CHARS else ""),
            }
        )
    return rows


async def _read(limit: int) -> tuple[list[Any], dict[Any, str]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW])),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
            limit=limit,
        )
        names = {}
        for deployment_id in {r.deployment_id for r in runs if r.deployment_id}:
            deployment = await client.read_deployment(deployment_id)
            names[deployment_id] = f"{FLOW}/{deployment.name}"
    return runs, names


def show_runs(limit: int = 20) -> int:
    """Print the latest `limit` runs of the experiment flow; 0 even when there are none."""
    from monolm.store import format_table
    from monolm.store.summary import non_empty_columns

    if not os.environ.get("PREFECT_API_URL"):
        url = served_api_url()
        if url:
            os.environ["PREFECT_API_URL"] = url
        else:
            print("(no Prefect server running: reading the run history in .state/prefect)")
    from infra.api_auth import use_served_auth

    use_served_auth()  # the served API requires its auth string (before Prefect is imported)
    runs, deployments = asyncio.run(_read(limit))
    source = os.environ.get("PREFECT_API_URL") or "the local run history"
    rows = flow_run_rows(runs, deployments)
    columns = non_empty_columns(rows, list(rows[0])) if rows else None
    print(format_table(rows, columns=columns, title=f"latest {FLOW} runs ({source})"))
    return 0
