"""`monolm results`: the results store as tables a researcher reads: the headline per run, one
run's every row, or two runs (or two cells of a grid) compared: their configuration difference
first, then the headline metrics."""

from __future__ import annotations

import argparse
from pathlib import Path

from monolm.config import load_config


def cmd_results(args: argparse.Namespace) -> int:
    from monolm.store import ResultsStore, format_table
    from monolm.store.summary import LONG_COLUMNS, SUMMARY_COLUMNS, headline_rows, long_rows, non_empty_columns

    cfg = load_config(args.preset_for_store)
    url = args.store or cfg.store_url
    with ResultsStore(url) as store:
        if args.compare:
            show_comparison(store, args, Path(cfg.paths.results_root))
            return 0
        run_id = store.resolve_run(args.run)["run_id"] if args.run else None
        metric = _metric(store, args, run_id)
        rows = store.query(preset=args.preset, variant=args.variant, arm=args.arm, metric=metric, run_id=run_id)
        if args.long:
            kept, hidden = long_rows(rows)
            print(format_table(kept, columns=non_empty_columns(kept, LONG_COLUMNS)))
            if hidden:
                print(f"({hidden} stored rows without a value not shown)")
            return 0
        runs = {r["run_id"]: r for r in store.runs()}
        print(format_table(headline_rows(rows, runs, metric=metric), columns=SUMMARY_COLUMNS))
        if not runs:
            print(f"(no runs in the results store {store.url} yet)")
        print(
            "(one row per run, arm and headline metric, mean over seeds; --metric NAME for another metric, "
            "--run RUN_ID for one run (its ID, name or a unique prefix), --long for every stored row)"
        )
    return 0


def _metric(store, args: argparse.Namespace, run_id: str | None) -> str | None:
    """`--metric` as stored (`perplexity` is `token_perplexity`); an unknown one is refused,
    listing the known ones."""
    from monolm.store.compare_view import resolve_metric

    if not args.metric:
        return None
    known = {r["metric"] for r in store.query(preset=args.preset, run_id=run_id)}
    return resolve_metric(args.metric, known) if known else args.metric


def show_comparison(store, args: argparse.Namespace, results_root: Path) -> None:
    """The two sides by full ID, how their configurations differ, then one row per quantity."""
    from monolm.store import format_table
    from monolm.store.compare_view import compare_table, config_difference, resolve_metric, side_facts

    # Runs (ID, name or prefix), or cells of a grid run (RUN@<cell>), shown by their full IDs.
    sides = [(store.resolve_run(run), at + cell) for run, at, cell in (r.partition("@") for r in args.compare)]
    a, b = (run["run_id"] + cell for run, cell in sides)
    facts = [side_facts(run, store.cell_rows(run["run_id"] + cell)) for run, cell in sides]
    compared = store.compare(a, b)
    print(f"A = {a}\nB = {b}")
    diff = config_difference(facts[0], facts[1], results_root)
    if diff:
        print(format_table(diff, title="Configuration: what differs"))
    else:
        print("Configuration: the same settings on both sides (same config digest)")
    metric = resolve_metric(args.metric, {r["metric"] for r in compared}) if args.metric else None
    rows = compare_table(compared, metric=metric, arm=args.arm, every=args.all)
    what = f"metric {metric}" if metric else "every metric" if args.all else "headline metrics"
    print(format_table(rows, title=f"{what}: mean over seeds, B − A"))
    if not (metric or args.all):
        print(
            "(--metric NAME or --arm ARM to choose, --all for every metric; p-values and summary rows are not "
            "differenced: see each run's report)"
        )


def add_results_parser(sub: argparse._SubParsersAction) -> None:
    """`monolm results`: the store, the filters, and a comparison of two runs or cells."""
    results = sub.add_parser("results", help="query the results store")
    results.add_argument("--store", help="SQLAlchemy URL (default: sqlite:///runs/results.sqlite)")
    results.add_argument("--preset", help="only this preset (tiny, quick, full)")
    results.add_argument("--variant", help="only this constraint variant")
    results.add_argument("--arm", help="only this arm: base, baseline or monotonic")
    results.add_argument("--model", dest="arm", help=argparse.SUPPRESS)  # deprecated alias of --arm, for one release
    results.add_argument("--metric", help="only this metric, e.g. perplexity (token_perplexity), abs_increase")
    results.add_argument("--run", metavar="RUN", help="only this run: its ID, its name or a unique prefix of either")
    results.add_argument("--long", action="store_true", help="every stored row (per seed, summaries, tests)")
    results.add_argument(
        "--compare",
        nargs=2,
        metavar=("RUN_A", "RUN_B"),
        help="two runs (IDs, names or unique prefixes), or two cells of a grid run (RUN@mlp_in RUN@mlp_both): "
        "how their configs differ, then the headline metrics (--metric/--arm choose, --all for every metric)",
    )
    results.add_argument("--all", action="store_true", help="with --compare: every metric, not only the headline")
    results.set_defaults(func=cmd_results, preset_for_store="tiny")
