"""The `experiment` flow: every seed's 7-stage pipeline in parallel, then stage 7 over all seeds.

Within a seed, stages 2 and 3 run in parallel, as do 5 and 6; seeds run in parallel with each
other. Tasks exchange small JSON results (paths, digests, metrics), never models. The task runner
comes from the `profile` (see `infra/profiles.py`), so the outer flow validates the config and
then runs the stages in a sub-flow built with that runner.
"""

from __future__ import annotations

import contextlib
from typing import Any

from prefect import flow, get_run_logger
from prefect.states import Completed

from flows.params import check_deployment_parameters, is_deployment_run
from infra.profiles import gpu_resources, make_task_runner
from monolm.config import ConfigError, ExperimentConfig, build_config, check_output_folders, load_config
from monolm.report.publish import check_results_folder
from monolm.study.cells import Cell, cells, grid_from_lists
from monolm.study.preflight import check_study
from monolm.study.registry import gpu_stages, model_stages, seed_stages
from tasks.aggregate import aggregate_task, publish_artifacts
from tasks.common import stage_options
from tasks.seed_stages import stage_task_for


class StagesFailed(RuntimeError):
    """Stages of the run failed; the message names each with its cause in full."""


def resolve_config(
    preset: str,
    seeds: list[int] | None,
    variant: str | None,
    overrides: list[str] | None,
    profile: str | None,
    run_name: str | None,
    named_overrides: list[str] | None = None,
    config_file: str | None = None,
    grid: dict[str, list[str]] | None = None,
) -> ExperimentConfig:
    extra: dict[str, Any] = {}
    if grid:
        extra["grid"] = grid
    if seeds:
        extra["seeds"] = seeds
    if variant:
        extra["constraint"] = {"variant": variant}
    if profile:
        extra["runner"] = {"profile": profile}
    if run_name:
        extra["run_name"] = run_name
    cfg = load_config(
        preset, overrides=named_overrides or [], config_file=config_file, extra=extra, sets=overrides or []
    )
    if not cfg.run_name:
        cfg = cfg.model_copy(update={"run_name": cfg.default_run_name})
    return cfg


def check_deployment_size(cfg: ExperimentConfig, profile: str | None, deployment_id: Any, log: Any) -> None:
    """A deployment run (UI, API, schedule; not `monolm run`, where the user chose on their own
    machine) of a real model says where it trains: on the `slurm` profile, or with an explicit
    `profile=local` (or dask-local), which is logged as a warning. Otherwise a bare
    `prefect deployment run experiment/seed-42 --param preset=full` would download and train
    Pythia-1.4B on whatever host runs the worker (on a cluster, the login node)."""
    if deployment_id is None or all(m.source == "tiny" for m in (cfg.model, *cfg.models.values())):
        return
    if cfg.runner.profile == "slurm":
        return
    if profile is None:
        raise ConfigError(
            f"profile: preset {cfg.preset} trains {cfg.model.name}; a deployment run of it needs profile=slurm "
            "(with config_file naming the site file), or an explicit profile=local to train it on the worker's host"
        )
    log.warning(
        "preset %s with profile=%s: %s is downloaded and trained on the worker's own host, as asked",
        cfg.preset,
        profile,
        cfg.model.name,
    )


def _deployment_id() -> Any:
    from prefect.runtime import deployment

    return deployment.id


def expand_all_variants(preset, grid, named_overrides, config_file, overrides) -> dict[str, list[str]]:
    """`variants: ["all"]`: every constraint variant the model's architecture has (each model's,
    for a model axis: the variants all of them have)."""
    if grid.get("variants") != ["all"]:
        return grid
    from monolm.study.preflight import applicable_variants

    base = resolve_config(
        preset,
        None,
        None,
        overrides,
        None,
        None,
        named_overrides,
        config_file,
        {k: v for k, v in grid.items() if k != "variants"},
    )
    return {**grid, "variants": applicable_variants(base)}


def _annotate(cfg: ExperimentConfig, stage: str):
    resources = gpu_resources(cfg, stage)
    if resources is None:
        return contextlib.nullcontext()
    import dask

    return dask.annotate(resources=resources)


def submit(task, cfg: ExperimentConfig, stage: str, **params):
    options = stage_options(cfg, stage)
    with _annotate(cfg, stage):
        return task.with_options(**options).submit(cfg=cfg.model_dump(mode="json"), **params)


def await_result(future, poll_seconds: float = 2.0):
    """`future.result()`, but on a task runner that can tell when its workers will never come
    (the `slurm` profile: a failed `sbatch` is otherwise only logged, and a job that asks for more
    than the partition has pends for ever: the flow would wait forever), check that between short
    waits, log why worker jobs are pending, and fail the flow with the reason."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    check = getattr(ctx.task_runner, "check_workers", None) if ctx else None
    if check is not None:
        log = get_run_logger()
        while not future.wrapped_future.done():
            future.wait(timeout=poll_seconds)
            if not future.wrapped_future.done():
                check(warn=log.warning, info=log.info)
    return future.result()


def submit_cell(cfg: ExperimentConfig, seed: int, shared: dict[str, Any]) -> dict[str, Any]:
    """Submit every per-seed stage of one cell; the model's constraint-independent stages are
    submitted once per (model, seed) and their futures kept in `shared` for the model's other
    cells (a 3-variant grid trains its baseline once per seed)."""
    futures: dict[str, Any] = {}
    for spec in seed_stages():
        if spec.scope == "model" and spec.name in shared:
            futures[spec.name] = shared[spec.name]
            continue
        inputs = {name: futures[name] for name in spec.inputs}
        futures[spec.name] = submit(stage_task_for(spec), cfg, spec.name, seed=seed, inputs=inputs)
        if spec.scope == "model":
            shared[spec.name] = futures[spec.name]
    return futures


@flow(name="experiment-stages")
def run_stages(cfg_data: dict[str, Any]) -> dict[str, Any]:
    """Submit every stage of every cell and seed at once; Prefect resolves the data dependencies."""
    cfg = build_config(cfg_data)
    grid_cells = cells(cfg)
    shared: dict[tuple[str, int], dict[str, Any]] = {}
    per_run: dict[str, dict[str, Any]] = {}  # "<seed>" (one cell) or "<cell>/seed-<n>" -> futures
    per_cell: list[dict[str, Any]] = []
    for cell in grid_cells:
        seeds = []
        for seed in cfg.seeds:
            futures = submit_cell(cell.cfg, seed, shared.setdefault((cell.model, seed), {}))
            seeds.append(futures)
            if len(grid_cells) == 1:
                per_run[str(seed)] = futures
                continue
            per_run[f"{cell.model}/shared/seed-{seed}"] = {k: f for k, f in futures.items() if k in model_stages()}
            per_run[f"{cell.label}/seed-{seed}"] = {k: f for k, f in futures.items() if k not in model_stages()}
        per_cell.append({"label": cell.label, "seeds": seeds})
    aggregate_future = submit(aggregate_task, cfg, "aggregate", seed=None, cells=per_cell)
    try:
        summary = await_result(aggregate_future)
    except Exception as exc:
        failed = sorted(
            {
                f"{stage} ({where}): {fut.state.message}"
                for where, f in per_run.items()
                for stage, fut in f.items()
                if fut.state.is_failed() or fut.state.is_crashed()
            }
        )
        if failed:  # name the stages that failed rather than "aggregate was never ready"
            raise StagesFailed("stage(s) failed: " + "; ".join(failed)) from exc
        raise
    # Which stages executed and which were cache hits ("Completed" vs "Cached"), per seed (and cell).
    summary["stage_states"] = {
        where: {stage: fut.state.name for stage, fut in f.items()} for where, f in per_run.items()
    }
    summary["stage_states"]["aggregate"] = aggregate_future.state.name
    return summary


@flow(name="experiment", log_prints=True)
def experiment(
    seeds: list[int] | None = None,
    preset: str = "tiny",
    variant: str | None = None,
    overrides: list[str] | None = None,
    profile: str | None = None,
    run_name: str | None = None,
    named_overrides: list[str] | None = None,
    config_file: str | None = None,
    nightly: bool = False,
    regression_tolerance: dict[str, Any] | None = None,
    variants: list[str] | None = None,
    models: list[str] | None = None,
    init: list[str] | None = None,
    site_checked: bool = False,
) -> dict[str, Any]:
    """Run the whole study: every seed of every cell of the grid `models` x `variants` x `init`
    (each defaults to the preset's single model, `constraint.variant` and `constraint.init`;
    `variants=["all"]`: every variant the model's architecture has). `overrides` are `key=value`
    strings (as `monolm run --set`), `named_overrides` names like `reference`, `config_file` a YAML
    of overrides (e.g. a site file such as infra/site-a100.example.yaml); the config is validated
    before anything runs.
    `nightly`: name the run `nightly-<preset>-<scheduled time>` and,
    after stage 7, compare it with the previous nightly run (`flows/nightly.py`;
    `regression_tolerance` overrides tolerances); a regression fails the run. An empty `profile`
    or `config_file` (a deploy-time setting left unset) means none.
    Every run first makes the site checks of `monolm verify` for each model whose stage 0 still has
    to run (a failed check fails the run in seconds, naming the cause and what to do, before any
    stage); `site_checked` says the caller (`monolm run`) made them already (ignored in a
    deployment run)."""
    log = get_run_logger()
    # Deploy-time settings arrive as text: an empty profile or config file means "not set".
    profile, config_file = profile or None, config_file or None
    try:
        if is_deployment_run():  # an allowlist: no config keys, a site file by name only (flows/params.py)
            config_file = check_deployment_parameters(dict(locals()))
            site_checked = False  # a deployment run always makes the site checks itself
        if nightly:
            run_name = _nightly_name(preset, run_name)
        grid = grid_from_lists(models, variants, init)
        cfg = resolve_config(
            preset,
            seeds,
            variant,
            overrides,
            profile,
            run_name,
            named_overrides,
            config_file,
            expand_all_variants(preset, grid, named_overrides, config_file, overrides),
        )
        study = _check_before_compute(cfg, profile, log)
    except ConfigError as exc:
        log.error("%s", exc)
        raise
    _announce(cfg, study, site_checked, log)
    stages = run_stages.with_options(task_runner=make_task_runner(cfg), flow_run_name=f"{cfg.run_name}-stages")
    return _finished(cfg, stages(cfg.model_dump(mode="json")), nightly, regression_tolerance)


def _check_before_compute(cfg: ExperimentConfig, profile: str | None, log: Any) -> list[Cell]:
    """The checks a run makes before any stage; returns the study's cells."""
    check_output_folders(cfg)
    check_results_folder(cfg)  # a folder stage 7 may not replace is refused before any compute
    check_deployment_size(cfg, profile, _deployment_id(), log)
    return check_study(cfg)  # before any stage: a variant the architecture lacks fails here, not in stage 1


def _announce(cfg: ExperimentConfig, study: list[Cell], site_checked: bool, log: Any) -> None:
    """The run's settings in the log, its untimed stages warned of, and the site checks of
    `monolm verify` unless the caller made them."""
    log.info(
        "experiment %s: preset=%s cells=%s recipe=%s seeds=%s profile=%s",
        cfg.run_name,
        cfg.preset,
        ", ".join(cell.label for cell in study),
        cfg.training.recipe,
        cfg.seeds,
        cfg.runner.profile,
    )
    _warn_untimed_stages(cfg, log)
    if not site_checked:  # fail in seconds, naming what is unreachable, rather than deep in stage 0
        from flows.nightly import verify_site

        verify_site(cfg.model_dump(mode="json"))


def _finished(cfg: ExperimentConfig, result: dict[str, Any], nightly: bool, tolerance: dict[str, Any] | None):
    """Publish the artifacts on this run, the one `prefect deployment run` links to (the sub-flow
    holds the stages' task runs and progress), check a nightly for regressions, and end with a
    state message that says where the report is."""
    result["artifacts"] = publish_artifacts(result)
    if nightly:
        from flows.nightly import regression_check

        result["regression"] = regression_check(cfg.store_url, result["run_id"], tolerance)
    return Completed(message=completion_message(result), data=result)


def completion_message(result: dict[str, Any]) -> str:
    """The finished run's state message in the UI and `monolm runs`: the answer when the report
    has one, then where the report is."""
    answer = str(result.get("answer") or "finished").rstrip(".")
    return f"{result['run_name']}: {answer}. Report: artifact `{result['artifacts']['report']}` and {result['report']}"


def _warn_untimed_stages(cfg: ExperimentConfig, log) -> None:
    """On the slurm profile, a GPU stage without a timeout holds its GPU job until the walltime."""
    if cfg.runner.profile == "slurm":
        untimed = sorted(gpu_stages() - set(cfg.runner.stage_timeout_minutes))
        if untimed:
            log.warning(
                "no runner.stage_timeout_minutes for GPU stage(s) %s: a stuck one holds its GPU job until the walltime",
                ", ".join(untimed),
            )


def _nightly_name(preset: str, run_name: str | None) -> str:
    """A nightly run's name starts with `nightly-` (that is how the next one finds it); by default
    it is dated by the run's scheduled start, so a retry keeps its name."""
    from flows.nightly import RUN_NAME_PREFIX, nightly_run_name

    if run_name:
        return run_name if run_name.startswith(RUN_NAME_PREFIX) else RUN_NAME_PREFIX + run_name
    from prefect.runtime import flow_run

    return nightly_run_name(preset, flow_run.scheduled_start_time)


def run_experiment(cfg: ExperimentConfig) -> dict[str, Any]:
    """`monolm run`: the same flow, called from the CLI with an already validated config (and its
    site checks made); a failure a user can act on reaches the console without a traceback."""
    from flows.console import hide_user_tracebacks
    from monolm.report.console import print_rows

    hide_user_tracebacks()
    grid = {"models": cfg.grid.models, "variants": cfg.grid.variants, "init": cfg.grid.inits}
    grid = {axis: list(values) for axis, values in grid.items() if values}  # flow parameters, shown as such in the UI
    sets = [s for s in _config_as_sets(cfg) if not s.startswith("grid.")]
    result = experiment(
        seeds=cfg.seeds, preset=cfg.preset, overrides=sets, run_name=cfg.run_name, site_checked=True, **grid
    )
    print_rows(f"{result['run_name']}: mean over {len(cfg.seeds)} seed(s)", result["table"])
    print(f"stages executed (not cache hits): {', '.join(executed_stages(result)) or 'none'}")
    return result


def executed_stages(result: dict[str, Any]) -> list[str]:
    """`stage[seed]` (in a grid `stage[<cell or model/shared>/seed-<n>]`) for every stage that ran
    rather than being a cache hit."""
    out = [
        f"{stage}[{seed}]"
        for seed, states in result["stage_states"].items()
        if isinstance(states, dict)
        for stage, state in states.items()
        if state != "Cached"
    ]
    return out + (["aggregate"] if result["stage_states"]["aggregate"] != "Cached" else [])


def _config_as_sets(cfg: ExperimentConfig) -> list[str]:
    """Express a resolved config as `key=value` overrides of its preset (so the flow's parameters
    stay small and readable in the UI)."""
    import json

    base = load_config(cfg.preset).model_dump(mode="json")
    mine = cfg.model_dump(mode="json")
    out: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in b:
                walk(a.get(key), b[key], f"{path}.{key}" if path else key)
        elif a != b and path not in ("run_name",):
            out.append(f"{path}={json.dumps(b)}")

    walk(base, mine, "")
    return out
