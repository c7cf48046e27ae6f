"""What a *deployment* run of the `experiment` flow may be given: an allowlist, validated and bounded.

Anyone who may start a deployment run (`prefect deployment run`, the UI, a schedule) chooses its
parameters, but the service runs as the person who started it, on their files and their cluster
account. So a deployment run may choose *what to study* (preset, seeds, the grid's axes, a named
recipe override, the task-runner profile, the run's name, regression tolerances) and *which site
file* to use, by name, from the checkout's `infra/` or the folder `MONOLM_SITE_DIR` names in the
service's environment. It may not set config keys (`overrides`): cluster settings
(`runner.slurm.*`: prologue lines, the worker's Python, sbatch directives), paths, the store URL
and everything else come only from site files and the environment of the person who started the
service. `monolm run` (the CLI, not a deployment run) keeps `--set` for every key.

Errors name the parameter and never echo its value (a parameter may hold a token pasted by mistake).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from monolm.config import ConfigError

REPO = Path(__file__).resolve().parent.parent
SITE_DIR_ENV = "MONOLM_SITE_DIR"

MAX_SEEDS = 32
MAX_AXIS_VALUES = 16
MAX_NAMED_OVERRIDES = 8
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # run names, variants, inits, named overrides
MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")  # a models: key (hub-like names allowed)
SITE_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/-]{0,199}\.ya?ml")

ALLOWED = (
    "preset",
    "seeds",
    "variant",
    "variants",
    "models",
    "init",
    "named_overrides",
    "profile",
    "run_name",
    "config_file",
    "nightly",
    "regression_tolerance",
)


def is_deployment_run() -> bool:
    """True inside a flow run that a deployment created (worker, `deployments.serve`, schedule)."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return bool(ctx and ctx.flow_run and ctx.flow_run.deployment_id)


def check_deployment_parameters(params: dict[str, Any]) -> str | None:
    """Refuse what a deployment run may not set; returns the site file's resolved path (or None)."""
    if params.get("overrides"):
        raise ConfigError(
            "overrides: a deployment run may not set config keys; it may choose "
            f"{', '.join(ALLOWED)}. Put cluster settings, paths and the store URL in a site file "
            f"(infra/ or ${SITE_DIR_ENV}) and pass its name as config_file"
        )
    seeds = params.get("seeds")
    if seeds is not None:
        _check_list("seeds", seeds, MAX_SEEDS)
        if not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**32 for s in seeds):
            raise ConfigError("seeds: each seed must be an integer in 0..4294967295")
    for field, pattern, limit in (
        ("variants", NAME, MAX_AXIS_VALUES),
        ("init", NAME, MAX_AXIS_VALUES),
        ("models", MODEL, MAX_AXIS_VALUES),
        ("named_overrides", NAME, MAX_NAMED_OVERRIDES),
    ):
        values = params.get(field)
        if values is not None:
            _check_list(field, values, limit)
            if not all(isinstance(v, str) and pattern.fullmatch(v) for v in values):
                raise ConfigError(f"{field}: each value must be a name ({pattern.pattern})")
    from monolm.config.loading import available_overrides, available_presets

    if params.get("preset") not in available_presets():
        raise ConfigError(f"preset: not a preset; allowed: {', '.join(available_presets())}")
    if not set(params.get("named_overrides") or []) <= set(available_overrides()):
        raise ConfigError(f"named_overrides: allowed: {', '.join(available_overrides())}")
    for field in ("variant", "run_name"):
        value = params.get(field)
        if value is not None and not (isinstance(value, str) and NAME.fullmatch(value)):
            raise ConfigError(f"{field}: must be a name of letters, digits, '.', '_' and '-' (at most 100)")
    _check_tolerances(params.get("regression_tolerance"))
    return resolve_site_file(params.get("config_file"))


def _check_list(field: str, values: Any, limit: int) -> None:
    if not isinstance(values, list):
        raise ConfigError(f"{field}: must be a list")
    if len(values) > limit:
        raise ConfigError(f"{field}: at most {limit} values in a deployment run")


def _check_tolerances(tolerances: Any) -> None:
    if tolerances is None:
        return
    if not isinstance(tolerances, dict) or len(tolerances) > 64:
        raise ConfigError("regression_tolerance: must be a mapping of at most 64 metric names to numbers")
    for key, value in tolerances.items():
        if not (isinstance(key, str) and MODEL.fullmatch(key)):
            raise ConfigError("regression_tolerance: each key must be a metric name")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError("regression_tolerance: each tolerance must be a number")


def site_roots() -> list[Path]:
    """Where a deployment run's site file may come from: the checkout's infra/ and
    `$MONOLM_SITE_DIR` (set by the person who starts the service)."""
    roots = [REPO / "infra"]
    configured = os.environ.get(SITE_DIR_ENV)
    if configured:
        roots.append(Path(configured))
    return [root.resolve() for root in roots]


def resolve_site_file(name: Any) -> str | None:
    """A site file named relative to the checkout (`infra/site-a100.example.yaml`) or to
    `$MONOLM_SITE_DIR` (`cluster.yaml`): no absolute path, no `..`, a .yaml file that (symlinks
    resolved) lies inside one of `site_roots()`."""
    if name is None or name == "":
        return None
    rule = (
        f"config_file: must name a site file (.yaml) in the checkout's infra/ or ${SITE_DIR_ENV}, "
        "e.g. infra/site-a100.example.yaml; absolute paths and '..' are refused"
    )
    if not isinstance(name, str) or not SITE_FILE.fullmatch(name) or ".." in Path(name).parts:
        raise ConfigError(rule)
    roots = site_roots()
    candidates = [REPO / name, REPO / "infra" / name] + [root / name for root in roots[1:]]
    for candidate in candidates:
        path = candidate.resolve()
        if path.is_file() and any(path.is_relative_to(root) for root in roots):
            return str(path)
    raise ConfigError(rule + " (no such file there)")
