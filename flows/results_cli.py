"""`monolm results`: the results store as tables a researcher reads: the headline per run, one
run's every row, or two runs (or two cells of a grid) compared."""

from __future__ import annotations

import argparse

from monolm.config import load_config


def cmd_results(args: argparse.Namespace) -> int:
    from monolm.store import ResultsStore, format_table
    from monolm.store.summary import (
        LONG_COLUMNS,
        SUMMARY_COLUMNS,
        compared_rows,
        headline_rows,
        long_rows,
        non_empty_columns,
    )

    url = args.store or load_config(args.preset_for_store).store_url
    with ResultsStore(url) as store:
        if args.compare:
            # Runs (ID, name or prefix), or cells of a grid run (RUN@<cell>), shown by their IDs.
            a, b = (
                store.resolve_run(run)["run_id"] + at + cell
                for run, at, cell in (r.partition("@") for r in args.compare)
            )
            print(format_table(compared_rows(store.compare(a, b)), title=f"B − A: A = {a}, B = {b}"))
            return 0
        run_id = store.resolve_run(args.run)["run_id"] if args.run else None
        rows = store.query(preset=args.preset, variant=args.variant, arm=args.arm, metric=args.metric, run_id=run_id)
        if args.long:
            kept, hidden = long_rows(rows)
            print(format_table(kept, columns=non_empty_columns(kept, LONG_COLUMNS)))
            if hidden:
                print(f"({hidden} stored rows without a value not shown)")
            return 0
        runs = {r["run_id"]: r for r in store.runs()}
        print(format_table(headline_rows(rows, runs, metric=args.metric), columns=SUMMARY_COLUMNS))
        if not runs:
            print(f"(no runs in the results store {store.url} yet)")
        print(
            "(one row per run, arm and headline metric, mean over seeds; --metric NAME for another metric, "
            "--run RUN for one run (ID, name or prefix), --long for every stored row)"
        )
    return 0
