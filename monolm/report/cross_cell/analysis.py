"""The cross-variant report of a grid run (stage 7 over many cells): for every model, one row per
constraint variant and init with what the constraint costs in quality and what it buys in
robustness, each number with its confidence interval and n, the paired tests against the
baseline corrected for multiple comparisons (Holm, over the rows of one model, per measure
family), the Pareto set, and findings sentences computed from those numbers.

Input: one record per cell, {"model", "parameters", "variant", "init", "results"}, where
`results` is that cell's results.json (`monolm.report.analyze`). Output: a JSON-able dict (grid.json)
that the renderers (`monolm.report.cross_cell.render`) and the figures (`monolm.report.cross_cell.figures`) read. No
I/O, so everything can be tested on hand-made numbers.

Conventions (as in a cell's report): differences are constrained − baseline; the quality cost is
the test loss difference in nats/token (the paired test across seeds, or with one seed the test
over the test documents) and the perplexity ratio exp(Δ loss); the robustness gain under an
attack is the baseline's absolute loss increase minus the constrained arm's (positive: harder to
attack), i.e. minus the paired difference. Uncorrected p-values stay what they are in each cell's
results.json; this dict carries them next to the Holm-adjusted ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from monolm import stats
from monolm.report.cross_cell.findings import across_model_findings, model_findings
from monolm.report.cross_cell.terms import QUALITY, cell_label, family_tests
from monolm.report.first_screen import primary_test
from monolm.report.labels import ATTACKS
from monolm.report.summaries import ALPHA, CONFIDENCE, summary

GRID_SCHEMA_VERSION = 1
CELL_KEYS = ("model", "variant", "init", "results")
BASELINE_CHECKS = (("evaluate", "loss"), *((attack, "abs_increase") for attack in ATTACKS))


def _estimate(
    value: float | None,
    ci: tuple[float | None, float | None],
    n: int | None,
    unit: str,
    ci_method: str | None = None,
) -> dict[str, Any]:
    """One number with its interval, how many units (seeds, texts, documents) it is over, and how
    the interval was obtained."""
    return {"value": value, "ci_low": ci[0], "ci_high": ci[1], "n": n, "unit": unit, "ci_method": ci_method}


def _from_summary(rec: dict[str, Any] | None) -> dict[str, Any] | None:
    """A cell's across-seed summary as an estimate; with one seed, n counts the examples its
    interval is over (texts or documents)."""
    if rec is None or rec.get("mean") is None:
        return None
    n, unit = rec["n"], "seeds"
    if rec["n"] == 1 and rec.get("n_examples"):
        n, unit = rec["n_examples"], "texts" if "texts" in (rec.get("ci_method") or "") else "documents"
    out = _estimate(rec["mean"], (rec.get("ci_low"), rec.get("ci_high")), n, unit, rec.get("ci_method"))
    out["n_seeds"] = rec["n"]
    return out


def _from_test(comp: dict[str, Any] | None) -> dict[str, Any] | None:
    """A cell's paired test (constrained − baseline) as an estimate with its p-values; `p_holm` and
    `significant_holm` are filled in once all rows of the model are known."""
    if comp is None:
        return None
    method = f"t-interval of the paired differences over {comp['scope']}"
    out = _estimate(comp["mean_diff"], (comp["ci_low"], comp["ci_high"]), comp["n"], comp["scope"], method)
    out.update(
        seed=comp.get("seed"),
        t_p=comp.get("t_p"),
        wilcoxon_p=comp.get("wilcoxon_p"),
        reason=comp.get("t_reason"),
        significant=bool(comp.get("significant")),
        p_holm=None,
        significant_holm=False,
        holm_m=None,
        mean_constrained=comp.get("mean_a"),
        mean_baseline=comp.get("mean_b"),
        sentence=comp.get("sentence"),
        mde=comp.get("mde"),  # what the test could detect with 80% power (monolm.stats_power)
    )
    return out


def _per_seed(results: dict[str, Any], stage: str, metric: str, sign: float) -> list[dict[str, Any]]:
    """sign · (constrained − baseline) of every seed that has both arms' value, from `values`."""
    by_arm: dict[str, dict[int, float]] = {"baseline": {}, "monotonic": {}}
    for rec in results["values"]:
        if rec["stage"] == stage and rec["metric"] == metric and rec["model"] in by_arm:
            by_arm[rec["model"]][int(rec["seed"])] = float(rec["value"])
    seeds = sorted(set(by_arm["baseline"]) & set(by_arm["monotonic"]))
    return [{"seed": s, "value": sign * (by_arm["monotonic"][s] - by_arm["baseline"][s])} for s in seeds]


def _quality(results: dict[str, Any]) -> dict[str, Any]:
    """Δ test loss (the paired test), the perplexity ratio exp(Δ loss) and both arms' perplexity."""
    delta = _from_test(primary_test(results, "evaluate", "loss"))
    ratio = None
    if delta is not None and delta["value"] is not None:
        lo, hi = delta["ci_low"], delta["ci_high"]
        ci = (None, None) if lo is None or hi is None else (math.exp(lo), math.exp(hi))
        method = f"exp of the Δ loss interval ({delta['ci_method']})" if lo is not None else None
        ratio = _estimate(math.exp(delta["value"]), ci, delta["n"], delta["unit"], method)
    if delta is not None:
        delta["per_seed"] = _per_seed(results, "evaluate", "loss", 1.0)
    return {
        "delta_loss": delta,
        "perplexity_ratio": ratio,
        "baseline_perplexity": _from_summary(summary(results, "evaluate", "baseline", "token_perplexity")),
        "constrained_perplexity": _from_summary(summary(results, "evaluate", "monotonic", "token_perplexity")),
    }


def _gain(diff: dict[str, Any] | None, base: dict[str, Any] | None, mono: dict[str, Any] | None) -> dict[str, Any]:
    """Robustness gain = baseline − constrained absolute loss increase: minus the paired difference
    (interval mirrored), or the difference of the arms' means when there is no paired test."""
    if diff is not None and diff["value"] is not None:
        lo, hi = diff["ci_low"], diff["ci_high"]
        ci = (None if hi is None else -hi, None if lo is None else -lo)
        return _estimate(-diff["value"], ci, diff["n"], diff["unit"], diff["ci_method"])
    value = base["value"] - mono["value"] if base and mono else None
    n = min(base["n_seeds"], mono["n_seeds"]) if base and mono else None
    return _estimate(value, (None, None), n, "seeds", None)


def _attack(results: dict[str, Any], attack: str) -> dict[str, Any] | None:
    """One attack's numbers for a row: each arm's absolute loss increase and success rate, the
    paired difference constrained − baseline and the gain (its negative); None without data."""
    diff = _from_test(primary_test(results, attack, "abs_increase"))
    base = _from_summary(summary(results, attack, "baseline", "abs_increase"))
    mono = _from_summary(summary(results, attack, "monotonic", "abs_increase"))
    if diff is None and mono is None:
        return None
    gain = _gain(diff, base, mono)
    gain["per_seed"] = _per_seed(results, attack, "abs_increase", -1.0)
    return {
        "constrained_abs_increase": mono,
        "baseline_abs_increase": base,
        "constrained_success_rate": _from_summary(summary(results, attack, "monotonic", "success_rate")),
        "baseline_success_rate": _from_summary(summary(results, attack, "baseline", "success_rate")),
        "difference": diff,
        "gain": gain,
    }


def _row(cell: dict[str, Any]) -> dict[str, Any]:
    """One (variant, init) row of a model's table."""
    results = cell["results"]
    seeds = [int(s) for s in (results.get("meta") or {}).get("seeds") or sorted({v["seed"] for v in results["values"]})]
    attacks = {attack: block for attack in ATTACKS if (block := _attack(results, attack)) is not None}
    return {
        "label": cell_label(cell["model"], cell["variant"], cell["init"]),
        "model": cell["model"],
        "variant": cell["variant"],
        "init": cell["init"],
        "run_name": results.get("run_name"),
        "seeds": seeds,
        "n_seeds": len(seeds),
        "quality": _quality(results),
        "attacks": attacks,
        "pareto": {},
    }


def apply_holm(rows: Sequence[dict[str, Any]], families: Sequence[str], alpha: float = ALPHA) -> None:
    """Holm-adjust the paired t-test p of every family over the rows (in place): `p_holm`,
    `significant_holm` and `holm_m` (how many tests the family has)."""
    for family in families:
        tests = [t for t in family_tests(rows, family) if t is not None]
        adjusted = stats.holm([t["t_p"] for t in tests])
        m = sum(p is not None for p in adjusted)
        for test, p_holm in zip(tests, adjusted, strict=True):
            test.update(p_holm=p_holm, significant_holm=p_holm is not None and p_holm < alpha, holm_m=m)


def pareto_optimal(points: Sequence[tuple[float, float]]) -> list[bool]:
    """Which (cost, gain) points no other point dominates (lower or equal cost and higher or equal
    gain, better in at least one): low cost and high gain are both wanted."""

    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] <= b[0] and a[1] >= b[1] and (a[0] < b[0] or a[1] > b[1])

    return [not any(dominates(q, p) for q in points) for p in points]


def _pareto(rows: Sequence[dict[str, Any]], attack: str) -> dict[str, Any]:
    """The Pareto set under one attack: rows with both a quality cost and a gain, and the baseline
    at (0, 0) as a candidate (a variant that costs quality and loses robustness is worse than none)."""
    rows_with = [
        r
        for r in rows
        if (r["quality"]["delta_loss"] or {}).get("value") is not None
        and ((r["attacks"].get(attack) or {}).get("gain") or {}).get("value") is not None
    ]
    points = [(0.0, 0.0)] + [
        (r["quality"]["delta_loss"]["value"], r["attacks"][attack]["gain"]["value"]) for r in rows_with
    ]
    optimal = pareto_optimal(points)
    for row, on_front in zip(rows_with, optimal[1:], strict=True):
        row["pareto"][attack] = on_front
    return {
        "optimal": [r["label"] for r, ok in zip(rows_with, optimal[1:], strict=True) if ok],
        "dominated": [r["label"] for r, ok in zip(rows_with, optimal[1:], strict=True) if not ok],
        "baseline_optimal": optimal[0],
        "not_placed": [r["label"] for r in rows if all(r is not placed for placed in rows_with)],
    }


def _baseline_mismatches(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Seeds whose baseline numbers differ between the cells of one model: with shared baseline
    stages they are identical, so a difference means the variants were compared to different
    baselines."""
    seen: dict[tuple[int, str, str], dict[str, float]] = {}
    for cell in cells:
        for rec in cell["results"]["values"]:
            if rec["model"] == "baseline" and (rec["stage"], rec["metric"]) in BASELINE_CHECKS:
                label = cell_label(cell["model"], cell["variant"], cell["init"])
                seen.setdefault((int(rec["seed"]), rec["stage"], rec["metric"]), {})[label] = float(rec["value"])
    return [
        {"seed": seed, "stage": stage, "metric": metric, "values": by_cell}
        for (seed, stage, metric), by_cell in sorted(seen.items())
        if not all(math.isclose(v, next(iter(by_cell.values())), rel_tol=1e-9, abs_tol=1e-12) for v in by_cell.values())
    ]


def _reference(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The baseline's own numbers (from the first row that has them): the figures' origin and the
    table notes."""
    ref: dict[str, Any] = {"perplexity": None, "attacks": {}}
    for row in rows:
        ref["perplexity"] = ref["perplexity"] or row["quality"]["baseline_perplexity"]
        for attack, block in row["attacks"].items():
            if attack not in ref["attacks"] and block["baseline_abs_increase"] is not None:
                ref["attacks"][attack] = {
                    "abs_increase": block["baseline_abs_increase"],
                    "success_rate": block["baseline_success_rate"],
                }
    return ref


def _model_entry(model: str, cells: Sequence[dict[str, Any]], alpha: float) -> dict[str, Any]:
    """Everything the report says about one model: its rows, Holm, Pareto sets and findings."""
    rows = [_row(cell) for cell in cells]
    attacks = [a for a in ATTACKS if any(a in row["attacks"] for row in rows)]
    families = [QUALITY, *attacks]
    apply_holm(rows, families, alpha)
    entry: dict[str, Any] = {
        "model": model,
        "parameters": cells[0].get("parameters"),
        "seeds": sorted({s for row in rows for s in row["seeds"]}),
        "attacks": attacks,
        "families": families,
        "baseline": _reference(rows),
        "baseline_mismatches": _baseline_mismatches(cells),
        "rows": rows,
        "pareto": {attack: _pareto(rows, attack) for attack in attacks},
    }
    entry["findings"] = model_findings(entry, alpha)
    return entry


def _check_cells(cells: Sequence[dict[str, Any]]) -> None:
    """Refuse malformed input, naming the cell and the field."""
    if not cells:
        raise ValueError("grid_analysis needs at least one cell")
    seen: dict[tuple[str, str, str], int] = {}
    parameters: dict[str, Any] = {}
    for i, cell in enumerate(cells):
        missing = [k for k in CELL_KEYS if k not in cell]
        if missing:
            raise ValueError(f"cell {i}: missing field(s) {', '.join(missing)} (needs {', '.join(CELL_KEYS)})")
        key = (cell["model"], cell["variant"], cell["init"])
        if key in seen:
            raise ValueError(f"cell {i} repeats {cell_label(*key)} (also cell {seen[key]})")
        seen[key] = i
        for field in ("values", "summaries", "comparisons"):
            if field not in cell["results"]:
                raise ValueError(f"cell {i} ({cell_label(*key)}): results has no {field!r} (not a results.json)")
        params = cell.get("parameters")
        if parameters.setdefault(cell["model"], params) != params:
            raise ValueError(
                f"cell {i}: model {cell['model']!r} has parameters={params}, another cell says "
                f"{parameters[cell['model']]}"
            )


def _across_models(models: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Robustness gain against model size, one series per (variant, init) present in at least two
    models of known, different sizes; None when the grid has fewer than two sizes."""
    sized = [m for m in models if m["parameters"] is not None]
    if len({m["parameters"] for m in sized}) < 2:
        return None
    series: dict[tuple[str, str], dict[str, Any]] = {}
    for m in sorted(sized, key=lambda m: m["parameters"]):
        for row in m["rows"]:
            entry = series.setdefault(
                (row["variant"], row["init"]), {"variant": row["variant"], "init": row["init"], "points": {}}
            )
            for attack, block in row["attacks"].items():
                gain = {k: v for k, v in block["gain"].items() if k != "per_seed"}
                point = {"model": m["model"], "parameters": m["parameters"], "label": row["label"], **gain}
                entry["points"].setdefault(attack, []).append(point)
    kept = [s for s in series.values() if any(len(p) >= 2 for p in s["points"].values())]
    return {"series": kept} if kept else None


def grid_analysis(cells: Sequence[dict[str, Any]], *, alpha: float = ALPHA) -> dict[str, Any]:
    """The cross-variant analysis of a grid run as one JSON-able dict (grid.json).

    `cells`: one record per (model, variant, init), {"model": str, "parameters": int | None,
    "variant": str, "init": str, "results": that cell's results.json}. Models and rows keep the
    order of first appearance in `cells`.
    """
    _check_cells(cells)
    by_model: dict[str, list[dict[str, Any]]] = {}
    for cell in cells:
        by_model.setdefault(cell["model"], []).append(cell)
    models = [_model_entry(model, model_cells, alpha) for model, model_cells in by_model.items()]
    across = _across_models(models)
    attacks = [a for a in ATTACKS if any(a in m["attacks"] for m in models)]
    return {
        "schema_version": GRID_SCHEMA_VERSION,
        "alpha": alpha,
        "confidence": CONFIDENCE,
        "attacks": {a: ATTACKS[a] for a in attacks},
        "success_threshold": next(
            (t for c in cells if (t := (c["results"].get("meta") or {}).get("success_threshold")) is not None), None
        ),
        "correction": {
            "method": "Holm",
            "test": stats.TEST_NAMES["t"],
            "families": [QUALITY, *attacks],
            "over": "the (variant, init) rows of one model",
        },
        "axes": {axis: list(dict.fromkeys(c[axis] for c in cells)) for axis in ("model", "variant", "init")},
        "cells": [cell_label(c["model"], c["variant"], c["init"]) for c in cells],
        "models": models,
        "across_models": across,
        "findings": [s for m in models for s in m["findings"]] + across_model_findings(across),
    }
