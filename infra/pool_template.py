"""The base job template of the project's `process` work pool: what a flow run may change.

Prefect's default template for a process pool lets every flow run set `command` (the command the
worker runs: any shell command, as the worker's user), `env` (e.g. `LD_PRELOAD`, `PYTHONPATH`)
and `working_dir` through its job variables, and anyone who may create a flow run may do so. The
pool runs only what the project deploys, so this template keeps the harmless variables (`name`,
`labels`, `stream_output`), drops those three from both the variables and the job configuration
(the worker then builds its own `python -m prefect.engine` command and the environment it was
started with) and forbids any other variable (`additionalProperties: false`): the server refuses
a flow run or deployment that sets one (HTTP 422).

    python -m infra.pool_template > template.json   # what infra/worker.sh gives the pool
"""

from __future__ import annotations

import copy
import json
import sys
from typing import Any

REMOVED = ("command", "env", "working_dir")


def locked_template(default: dict[str, Any] | None = None) -> dict[str, Any]:
    """Prefect's default process-pool template without the variables in `REMOVED`."""
    if default is None:
        from prefect.workers.process import ProcessWorker

        default = ProcessWorker.get_default_base_job_template()
    template = copy.deepcopy(default)
    for name in REMOVED:
        template["job_configuration"].pop(name, None)
        template["variables"]["properties"].pop(name, None)
    variables = template["variables"]
    variables["required"] = [r for r in variables.get("required", []) if r not in REMOVED]
    variables["additionalProperties"] = False
    return template


def main() -> int:
    json.dump(locked_template(), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
