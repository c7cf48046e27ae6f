"""What `monolm results` shows by default: one row per run, arm and headline metric (the mean of
its per-seed values), instead of every stored row (a one-seed tiny run stores about 800, most of
them summary statistics that are empty for one seed)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from monolm.store.results_store import cell_label
from monolm.study.registry import ATTACKS, stage_names


# (stage, metric) shown by default: held-out quality and the primary attack effect.
def headline() -> tuple[tuple[str, str], ...]:
    return (("evaluate", "token_perplexity"), *((attack, "abs_increase") for attack in ATTACKS))


SUMMARY_COLUMNS = ("run_id", "created", "status", "cell", "arm", "stage", "metric", "mean", "n_seeds")
LONG_COLUMNS = ("run_id", "seed", "arm", "stage", "metric", "value")  # preset, variant, recipe: in the ID


def headline_rows(
    rows: Sequence[dict[str, Any]], runs: dict[str, dict[str, Any]], *, metric: str | None = None
) -> list[dict[str, Any]]:
    """Per-seed metric rows (from `ResultsStore.query`) as one row per (run, grid cell, arm, stage,
    metric): the mean over seeds and how many seeds have a value. Only the headline metrics unless
    `metric` names one; summary statistics and tests (`<metric>:<stat>`, seed NULL) are left out."""
    shown = headline()
    wanted = (lambda stage, name: name == metric) if metric else (lambda stage, name: (stage, name) in shown)
    groups: dict[tuple[str, str, Any, Any, str], list[float]] = {}
    for row in rows:
        if row["seed"] is None or row["value"] is None or not wanted(row["stage"], row["metric"]):
            continue
        key = (row["run_id"], cell_label(row), row["arm"], row["stage"], row["metric"])
        groups.setdefault(key, []).append(row["value"])
    out = []
    for (run_id, cell, arm, stage, name), values in groups.items():
        run = runs.get(run_id) or {}
        out.append(
            {
                "run_id": run_id,
                "created": (run.get("created_at") or "")[:16].replace("T", " "),
                "status": run.get("status"),
                "cell": cell,
                "arm": arm,
                "stage": stage,
                "metric": name,
                "mean": math.fsum(values) / len(values),
                "n_seeds": len(values),
            }
        )
    run_order = {run_id: i for i, run_id in enumerate(runs)}
    stage_order = {name: i for i, name in enumerate(stage_names())}
    out.sort(
        key=lambda r: (
            run_order.get(r["run_id"], -1),
            stage_order.get(r["stage"], 99),
            r["metric"],
            r["cell"],
            r["arm"] or "",
        )
    )
    return out


def long_rows(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Every stored row that has a value, and how many without one were left out (an interval
    that needs two seeds, in a one-seed run)."""
    kept = [r for r in rows if r["value"] is not None]
    return kept, len(rows) - len(kept)


def non_empty_columns(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> list[str]:
    """The columns that hold a value in at least one row."""
    return [c for c in columns if any(r.get(c) is not None for r in rows)]
