"""`monolm results --compare A B` as a reader wants it: first how the two sides' configurations
differ (what the comparison is of), then the headline metrics one row per quantity (arm, stage,
metric: the mean over seeds on each side, their difference and relative change). Summary
statistics (`<metric>:mean`, `:ci_low`, ...) would repeat the same quantity, and a difference of
two p-values or of two tests' differences means nothing, so neither is shown; `--all` shows every
other metric, `--metric`/`--arm` choose."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from monolm.study.registry import ATTACKS, stage_names

HEADLINE_METRICS = ("token_perplexity", "abs_increase", "success_rate")
# Names a reader meets in the tables (the run table's columns) for the stored metric names.
ALIASES = {
    "perplexity": "token_perplexity",
    "test perplexity": "token_perplexity",
    "damage": "abs_increase",
    "success": "success_rate",
}
RUN_FIELDS = ("preset", "model", "variant", "init", "recipe", "seeds", "config_digest", "code_revision")
# The config.yaml settings the run facts above already show.
SHOWN_AS_FACT = {"preset", "model.name", "constraint.variant", "constraint.init", "training.recipe", "seeds"}


class UnknownMetric(KeyError):
    """A metric the results hold under no name; the message lists the known ones."""

    def __str__(self) -> str:
        return str(self.args[0])


def quantity(row: dict[str, Any]) -> bool:
    """A per-seed quantity of one arm: not a summary statistic or test (`metric:stat`), not a
    difference between arms (`monotonic-baseline`), not a confidence bound of a per-seed value."""
    metric, arm = row.get("metric") or "", row.get("arm") or ""
    return ":" not in metric and "-" not in arm and not metric.endswith(("_ci_low", "_ci_high"))


def resolve_metric(name: str, known: Iterable[str]) -> str:
    """The stored metric `name` means (a table's column name such as `perplexity` is accepted);
    `UnknownMetric` naming the closest and listing every known metric otherwise."""
    known = sorted(set(known))
    wanted = ALIASES.get(name.strip().lower(), name)
    if wanted in known:
        return wanted
    close = difflib.get_close_matches(name, [*known, *ALIASES], n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(ALIASES.get(c, c)) for c in close)}?" if close else ""
    raise UnknownMetric(f"--metric {name!r}: no such metric in these results{hint} Known: {', '.join(known)}")


def _order(row: dict[str, Any]) -> tuple:
    stages = {name: i for i, name in enumerate(stage_names())}
    headline = row["metric"] in HEADLINE_METRICS and (row["stage"] == "evaluate" or row["stage"] in ATTACKS)
    wall = row["metric"] == "wall_time_s"
    return (not headline, wall, stages.get(row["stage"], 99), row["metric"], row["arm"] or "")


def compare_table(
    compared: Sequence[dict[str, Any]], *, metric: str | None = None, arm: str | None = None, every: bool = False
) -> list[dict[str, Any]]:
    """`ResultsStore.compare` rows as the table: one row per quantity, headline metrics first
    (only those unless `every` or `metric`), wall times last."""
    rows = [r for r in compared if quantity(r) and (r["mean_a"] is not None or r["mean_b"] is not None)]
    if metric:
        rows = [r for r in rows if r["metric"] == metric]
    elif not every:
        rows = [r for r in rows if r["metric"] in HEADLINE_METRICS and r["stage"] in ("evaluate", *ATTACKS)]
    if arm:
        rows = [r for r in rows if r["arm"] == arm]
    out = []
    for r in sorted(rows, key=_order):
        change = r["rel_diff"]
        out.append(
            {
                "arm": r["arm"] or "—",
                "stage": r["stage"],
                "metric": r["metric"],
                "A": r["mean_a"],
                "B": r["mean_b"],
                "B − A": r["diff"],
                "change (%)": None if change is None else 100 * change,
                "seeds A/B": f"{r['n_a']}/{r['n_b']}",
            }
        )
    return out


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: node}


def _config_file(results_root: Path | None, run: dict[str, Any]) -> dict[str, Any] | None:
    """The run's config.yaml in its results folder, flattened, when it is there."""
    if results_root is None or not run.get("run_name"):
        return None
    path = Path(results_root) / run["run_name"] / "config.yaml"
    if not path.is_file():
        return None
    import yaml

    try:
        return _flat(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    except (OSError, yaml.YAMLError):
        return None


def config_difference(
    side_a: dict[str, Any], side_b: dict[str, Any], results_root: Path | None = None
) -> list[dict[str, Any]]:
    """The settings that differ between the two sides: the store's run facts (for a grid cell its
    model, variant and init), then, when both results folders hold their config.yaml, every
    differing setting of it (its own run name and paths aside)."""
    rows = []
    for field in RUN_FIELDS:
        a, b = side_a.get(field), side_b.get(field)
        if a != b:
            rows.append({"setting": field, "A": a, "B": b})
    files = [_config_file(results_root, side) for side in (side_a, side_b)]
    if files[0] is not None and files[1] is not None:
        shown = {r["setting"] for r in rows}
        for key in sorted(set(files[0]) | set(files[1])):
            if key == "run_name" or key.startswith("paths.") or key in shown or key in SHOWN_AS_FACT:
                continue
            a, b = files[0].get(key), files[1].get(key)
            if a != b:
                rows.append({"setting": key, "A": a, "B": b})
    return rows


def side_facts(run: dict[str, Any], cell_rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A side's facts: the run's, with a grid cell's own model, variant and init."""
    facts = dict(run)
    for field in ("model", "variant", "init"):
        values = {r.get(field) for r in cell_rows if r.get(field) is not None}
        if len(values) == 1:
            facts[field] = values.pop()
    return facts
