"""Serve every deployment in `prefect.yaml` from one process: the single-machine service.

    python -m deployments.serve            # needs PREFECT_API_URL (a running server)
    python -m deployments.serve --list     # print what would be served, then exit
    python -m deployments.serve --replace  # take over deployments `prefect deploy` created

Why: `prefect deploy --all` + `prefect worker start` needs a work pool and a second long-running
process; on one laptop or workstation a single `serve` process that owns the deployments and runs
their flow runs as subprocesses is simpler. The deployments are the very ones of `prefect.yaml`
(same names, parameters, schedules): this module runs the YAML's build steps (shell steps, run
with Prefect's `run_shell_script`, so the nightly cron and time zone come from
MONOLM_NIGHTLY_CRON / MONOLM_NIGHTLY_TZ with the YAML's defaults) and templates the deployments
with their outputs. Only what `serve` cannot
express is dropped: the work pool (served runs never go through one) and the pull steps (flow
runs start in this checkout, which is the working directory of this process).

Use either this or `prefect deploy` + a worker, not both: deployments share their names. If
`prefect deploy` already bound them to a work pool, serve refuses (a worker would take the runs,
see `worker_bound`); stop the worker and pass `--replace`. `prefect deploy --all` later takes them
back.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from infra.api_auth import use_served_auth

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILE = REPO / "prefect.yaml"


def load_project(path: Path = PROJECT_FILE) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


SHELL_STEP = "prefect.deployments.steps.run_shell_script"


def build_outputs(project: Mapping[str, Any]) -> dict[str, Any]:
    """Run the project's build steps as `prefect deploy` does and return their outputs by step id.
    Only `run_shell_script` steps are supported (all this project uses), called directly: Prefect's
    generic step runner would resolve block and variable references through an API client and, with
    no server configured, start a temporary one."""
    from prefect.deployments.steps.utility import run_shell_script
    from prefect.utilities.templating import apply_values

    outputs: dict[str, Any] = {}
    for step in project.get("build") or []:
        ((fqn, inputs),) = step.items()
        if fqn != SHELL_STEP:
            raise ValueError(f"build step {fqn} is not supported by deployments.serve (only {SHELL_STEP})")
        inputs = dict(inputs)
        step_id = inputs.pop("id", None)
        inputs.pop("requires", None)
        inputs = apply_values(apply_values(inputs, outputs), os.environ)
        inputs.setdefault("directory", str(REPO))
        inputs.setdefault("stream_output", False)
        result = asyncio.run(run_shell_script(**inputs))
        if step_id:
            outputs[step_id] = result
    return outputs


def deployment_specs(
    project: Mapping[str, Any] | None = None, outputs: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Each deployment of `prefect.yaml` with its templates filled in: name, entrypoint,
    parameters, description, tags, schedules (cron, timezone, parameters, slug, active)."""
    from prefect.utilities.templating import apply_values

    project = load_project() if project is None else project
    outputs = build_outputs(project) if outputs is None else outputs
    specs = []
    for raw in project.get("deployments") or []:
        spec = apply_values(dict(raw), dict(outputs), remove_notset=False)
        for schedule in spec.get("schedules") or []:
            if "cron" not in schedule:
                raise ValueError(f"deployment {spec['name']}: only cron schedules can be served, got {schedule}")
        specs.append(
            {key: spec.get(key) for key in ("name", "entrypoint", "parameters", "description", "tags", "schedules")}
        )
    return specs


def as_bool(value: Any) -> bool:
    """A templated YAML switch ("true"/"false" from a build step's stdout, or a YAML bool)."""
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() in ("true", "on", "1", "yes"):
        return True
    if str(value).strip().lower() in ("false", "off", "0", "no", ""):
        return False
    raise ValueError(f"not a true/false switch: {value!r}")


def runner_deployments(specs: Sequence[Mapping[str, Any]]) -> list[Any]:
    """`RunnerDeployment`s for `prefect.serve` (flows loaded from their entrypoints in the checkout)."""
    from prefect.flows import load_flow_from_entrypoint
    from prefect.schedules import Cron

    flows: dict[str, Any] = {}
    out = []
    for spec in specs:
        entrypoint = spec["entrypoint"]
        if entrypoint not in flows:
            flows[entrypoint] = load_flow_from_entrypoint(str(REPO / entrypoint))
        schedules = [
            Cron(
                s["cron"],
                timezone=s.get("timezone"),
                parameters=s.get("parameters") or {},
                slug=s.get("slug"),
                active=as_bool(s.get("active", True)),
            )
            for s in spec.get("schedules") or []
        ]
        out.append(
            flows[entrypoint].to_deployment(
                name=spec["name"],
                parameters=spec.get("parameters") or {},
                description=spec.get("description"),
                tags=spec.get("tags"),
                schedules=schedules or None,
            )
        )
    return out


async def worker_bound(names: Sequence[str], replace: bool) -> list[str]:
    """Deployments of these names (`flow/deployment`) that exist on the server bound to a work
    pool. Served and worker deployments of one name replace each other only in part: the served
    upsert keeps the old work pool but drops the pull steps, so a worker would take the run and
    start it in a temporary directory without the code. With `replace`
    they are deleted first (their past flow runs stay)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    bound = []
    async with get_client() as client:
        for name in names:
            try:
                existing = await client.read_deployment_by_name(name)
            except ObjectNotFound:
                continue
            if existing.work_pool_name:
                bound.append(f"{name} (work pool {existing.work_pool_name})")
                if replace:
                    await client.delete_deployment(existing.id)
    return bound


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deployments.serve", description="Serve all deployments of prefect.yaml from this process."
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=1,
        help="flow runs executed at once (default 1: a small machine runs one study at a time)",
    )
    parser.add_argument("--list", action="store_true", help="print the deployments and schedules, then exit")
    parser.add_argument(
        "--replace",
        action="store_true",
        help="delete deployments of the same names that `prefect deploy` bound to a work pool",
    )
    args = parser.parse_args(argv)
    use_served_auth()  # the server `make serve` started requires its auth string (before Prefect loads)
    specs = deployment_specs()
    if args.list:
        for spec in specs:
            schedules = ", ".join(
                f"cron '{s['cron']}' {s.get('timezone') or 'UTC'} {s.get('parameters') or {}} "
                + ("active" if as_bool(s.get("active", True)) else "inactive (MONOLM_NIGHTLY=on activates it)")
                for s in spec.get("schedules") or []
            )
            print(f"experiment/{spec['name']}: {spec['parameters']}" + (f"; {schedules}" if schedules else ""))
        return 0
    if not os.environ.get("PREFECT_API_URL"):
        print(
            "PREFECT_API_URL is not set: start a server first (infra/server/prefect-server.sh start) and "
            "export PREFECT_API_URL=$(infra/server/prefect-server.sh url)",
            file=sys.stderr,
        )
        return 2
    os.chdir(REPO)  # served flow runs start in the checkout (their entrypoints are relative to it)
    sys.path.insert(0, str(REPO))
    from prefect import serve

    deployments = runner_deployments(specs)
    bound = asyncio.run(worker_bound([f"{d.flow_name}/{d.name}" for d in deployments], args.replace))
    if bound and not args.replace:
        print(
            "these deployments exist on the server bound to a work pool (`prefect deploy`), so a worker would "
            f"take their runs: {', '.join(bound)}. Stop the worker and pass --replace to delete and serve them.",
            file=sys.stderr,
        )
        return 2
    serve(*deployments, limit=args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
