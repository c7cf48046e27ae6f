"""The `monolm` command line: run the experiment, verify a site, show configs, query results,
list runs and their state.

It lives in the orchestration layer because `monolm run` starts the Prefect flow; the library in
`monolm/` never imports Prefect. Only `run` (without `--no-prefect`) and `runs` import it:
answering a bad config, `config show`, `verify` and `results` stay quick."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from flows.cli_config import add_config_args, config_from_args  # noqa: F401  (config_from_args: re-exported)
from flows.results_cli import add_results_parser
from monolm.config import ConfigError, check_output_folders, config_to_yaml
from monolm.core.errors import PermanentError
from monolm.study.registry import SEED_STAGES


def prefect_environment() -> None:
    """Defaults for running flows from the CLI (set before prefect is imported): run history in a
    project-local PREFECT_HOME (SQLite) unless PREFECT_API_URL points at a server, no analytics
    calls (offline machines), and time for a temporary server to start on a busy machine. The
    default `.state/` and its `prefect/` (the database) are this user's only (0700)."""
    import os

    from monolm.core.private import own_private_files, own_state_dir

    if "PREFECT_HOME" not in os.environ:
        state = own_state_dir(Path(".state").resolve(), keep_search=True)
        os.environ["PREFECT_HOME"] = str(own_state_dir(state / "prefect"))
    home = Path(os.environ["PREFECT_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    own_private_files(home, "prefect.db*")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from infra.api_auth import use_served_auth

    use_served_auth()  # PREFECT_API_URL at the server `make serve` started: send its auth string


LAST_SEED_STAGE = SEED_STAGES[-1].number  # `--stages N` runs stages 0..N of a seed; aggregate needs the flow


def _last_stage(args: argparse.Namespace) -> int:
    """The last stage `--stages` asks for; refused without `--no-prefect`, whose flow always runs
    every stage and the report (a partial flow would silently skip what was asked for)."""
    if args.stages is None:
        return LAST_SEED_STAGE
    if not args.no_prefect:
        raise ConfigError(
            f"--stages {args.stages} needs --no-prefect: the flow always runs every stage and the report; "
            f"for stages 0-{args.stages} only, run `monolm run --no-prefect --stages {args.stages} ...`"
        )
    if not 0 <= args.stages <= LAST_SEED_STAGE:
        raise ConfigError(f"--stages {args.stages}: allowed 0..{LAST_SEED_STAGE} (the last stage to run)")
    return args.stages


def cmd_run(args: argparse.Namespace) -> int:
    last = _last_stage(args)
    if args.quiet:
        from monolm.core.logs import quiet_progress_bars

        quiet_progress_bars()
    cfg = config_from_args(args)  # validated before any compute
    check_output_folders(cfg, results=not args.no_prefect)  # --no-prefect stops before stage 7
    from monolm.study.preflight import check_study

    study = check_study(cfg)  # each cell, and its variant against the architecture where known
    if args.dry_run:
        from monolm.study.dry_run import format_plan, plan_study

        print(format_plan(cfg, plan_study(cfg, last), aggregate=not args.no_prefect))
        return 0
    started, answer = time.time(), None
    from monolm.study.site_preflight import site_preflight

    site_preflight(cfg)  # `monolm verify`'s checks for each model still to set up: fail here, in seconds
    if args.no_prefect:
        from monolm.report.console import print_rows
        from monolm.study.sequential import run_seed, summary_rows

        for cell in study:
            for seed in cfg.seeds:
                refs = run_seed(cell.cfg, seed, stages=last, progress=not args.quiet)
                print_rows(
                    f"seed {seed} ({cfg.preset}, {cell.label}, recipe {cfg.training.recipe})", summary_rows(refs)
                )
                if "constrain" in refs:
                    print_constrain(refs["constrain"].path / "report.json")
    else:
        prefect_environment()
        from flows.experiment import run_experiment
        from monolm.study.layout import cell_paths

        result = run_experiment(cfg)
        if len(study) == 1:
            print_constrain(cell_paths(study[0].cfg, cfg.seeds[0]).stage("constrain") / "report.json")
        print(f"results folder: {result['dir']}")
        if result.get("earlier"):  # other configurations of this study, kept beside it
            print(f"earlier runs of this study (kept): {', '.join(result['earlier'])}")
        print(f"report: {result['report']}")
        print(f"run ID: {result['run_id']} (`monolm results --run {result['run_id']}` shows its numbers)")
        answer = result.get("answer")  # the answer in one sentence (per cell of a grid), last
    print(f"wall time: {time.time() - started:.1f} s")
    if answer:
        print(answer)
    return 0


def print_constrain(path: Path) -> None:
    import json

    from monolm.report.console import print_rows

    report = json.loads(path.read_text())
    summary = report["summary"]
    blocks = {r["target"]: r for r in report["monotonicity"] if r["sublayer"] == "block"}
    print_rows(
        f"stage 1: non-negative weights, variant {report['variant']} (init {report['init']})",
        [
            {
                "module": row["name"],
                "role": row["role"],
                "params": row["n_params"],
                "negative before (%)": _pct(row["frac_negative_before"]),
                "relative change": row["rel_change"],
                "block monotonicity violations (%)": _pct(blocks.get(row["name"], {}).get("coord_violation_rate")),
            }
            for row in summary["modules"]
        ],
    )
    print(
        f"constrained share of parameters: {summary['share_of_params']:.3f}; function drift: "
        + ", ".join(f"{k}={v:.4g}" for k, v in report["drift"].items() if isinstance(v, float))
    )
    print(report["note"])


def _pct(fraction: float | None) -> float | None:
    return None if fraction is None else 100 * fraction


def cmd_verify(args: argparse.Namespace) -> int:
    from monolm.study.site_checks import run_checks

    cfg = config_from_args(args)
    checks = run_checks(cfg, timeout=args.timeout)
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"{c.status}  {c.name:<{width}}  {c.detail}")
        if c.next_step:
            print(f"{'':6}{'':<{width}}  next: {c.next_step}")
    failed = [c for c in checks if c.ok is False]
    skipped = [c for c in checks if c.ok is None]
    passed = len(checks) - len(failed) - len(skipped)
    print(f"{passed} passed, {len(failed)} failed" + (f", {len(skipped)} skipped" if skipped else ""))
    return 1 if failed else 0


def cmd_config(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    print(config_to_yaml(cfg), end="")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    prefect_environment()
    from flows.runs import show_runs

    return show_runs(args.limit)


def _runs_parser(sub: argparse._SubParsersAction) -> None:
    runs = sub.add_parser("runs", help="the latest experiment runs and their state (Prefect server or local history)")
    runs.add_argument("--limit", type=int, default=20, help="how many runs, newest first (default 20)")
    runs.set_defaults(func=cmd_runs)


def _run_parser(sub: argparse._SubParsersAction) -> None:
    """`monolm run`: the config options, the runner, the run's name and how much of it to run."""
    run = sub.add_parser("run", help="run the experiment (stages 0-7) for the given seeds")
    add_config_args(run)
    run.add_argument("--profile", choices=["local", "dask-local", "slurm"], help="task runner profile")
    run.add_argument("--run-name", help="name of the results folder results/<run-name>/")
    run.add_argument("--no-prefect", action="store_true", help="plain sequential run without the orchestrator")
    run.add_argument(
        "--stages", type=int, metavar="N", help=f"with --no-prefect: run stages 0..N only (default {LAST_SEED_STAGE})"
    )
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="print the grid and how many stage executions it implies (and how many are done already), run nothing",
    )
    run.set_defaults(func=cmd_run)


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand, in the order `monolm --help` lists them."""
    parser = argparse.ArgumentParser(prog="monolm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)

    verify = sub.add_parser("verify", help="check that stage 0 can run here (hub, model, data, disk)")
    add_config_args(verify)
    verify.add_argument("--timeout", type=float, default=30.0, help="seconds per check")
    verify.set_defaults(func=cmd_verify)

    config = sub.add_parser("config", help="show the resolved configuration")
    config.add_argument("action", choices=["show"])
    add_config_args(config)
    config.set_defaults(func=cmd_config)

    from flows.plan_cli import add_plan_parser

    add_plan_parser(sub)
    add_results_parser(sub)
    _runs_parser(sub)
    from flows.clean import add_clean_parser

    add_clean_parser(sub)
    return parser


def _user_facing(exc: Exception) -> int | None:
    """Exit code for errors caused by the user's input or machine, not by a bug (printed without a
    traceback): 2 for bad data, a model that cannot be found, or a checkpoint of another model or
    recipe in the run's folder, a run the results store does not know; 1 for a stage stopped by a
    full disk or an unwritable folder. The
    classes are looked up only if their module was loaded, so `monolm config` never imports torch."""
    kinds = {
        ("monolm.data.splits", "DataError"): 2,
        ("monolm.models.loading", "ModelError"): 2,
        ("monolm.training.checkpoint", "CheckpointMismatch"): 2,
        ("monolm.study.frame", "StageFailed"): 1,
        ("monolm.store.lookup", "UnknownRun"): 2,
        ("monolm.store.compare_view", "UnknownMetric"): 2,
        ("flows.experiment", "StagesFailed"): 1,
    }
    for (module, name), code in kinds.items():
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return code
    return None


def main(argv: list[str] | None = None) -> int:
    from monolm.core.logs import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.func(args)
    except (ConfigError, PermanentError) as exc:  # no retry or traceback helps: the cause, in full
        print(f"monolm: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        code = _user_facing(exc)
        if code is None:
            raise
        print(f"monolm: {exc}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("monolm: interrupted; finished stages are kept and a re-run resumes", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
