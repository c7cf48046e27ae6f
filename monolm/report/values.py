"""Every number of one seed as flat records {seed, stage, model, metric, value}, pulled from the
seed's verified stage outputs (the plain `SeedData` dict of `monolm.report.seed_inputs.read_seed`),
and the per-example arrays (texts, documents) that the within-seed statistics use."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from monolm.report.labels import ARMS, ATTACKS, MODELS

EVAL_KEYS = ("token_perplexity", "loss", "bits_per_byte", "byte_perplexity", "word_perplexity", "tokens", "docs")
ATTACK_KEYS = ("abs_increase", "rel_increase", "success_rate", "clean_loss", "attacked_loss")
# metrics whose per-example values are in `per_example.json` ({arm: {clean: [...], attacked: [...]}})
EXAMPLE_METRICS = ("abs_increase", "rel_increase", "clean_loss", "attacked_loss")
TRAIN_KEYS = ("steps", "tokens_seen", "lr", "effective_batch_size")
CONSTRAIN_KEYS = ("n_modules", "constrained_params", "share_of_params", "frac_negative_before", "rel_change")


def example_effects(per_example: dict[str, Any], arm: str) -> dict[str, np.ndarray]:
    """Per-text clean/attacked losses of one arm and the effects derived from them."""
    rec = per_example[arm]
    clean = np.asarray(rec["clean"], dtype=float)
    attacked = np.asarray(rec["attacked"], dtype=float)
    if clean.shape != attacked.shape or clean.ndim != 1:
        raise ValueError(f"per_example[{arm!r}]: clean and attacked must be equally long lists")
    return {
        "clean_loss": clean,
        "attacked_loss": attacked,
        "abs_increase": attacked - clean,
        "rel_increase": (attacked - clean) / clean,
    }


def doc_losses(evaluation: dict[str, Any], model: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(nll, tokens) per evaluation document when stage 4 stored them, else None."""
    per_doc = evaluation.get("models", {}).get(model, {}).get("per_doc")
    if not per_doc:
        return None
    return (
        np.asarray([d["nll"] for d in per_doc], dtype=float),
        np.asarray([d["tokens"] for d in per_doc], dtype=float),
    )


def monotonicity_rates(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Pool `monolm.constraint.monotonicity` rows per (role, sublayer): coordinate violations over all
    coordinates, pair violations over all pairs, and the largest relative drop."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(str(row.get("role")), str(row.get("sublayer")))].append(row)
    out: dict[str, float] = {}
    for (role, sublayer), items in groups.items():
        coords = sum(r.get("n_coords", 0) for r in items)
        pairs = sum(r.get("n_pairs", 0) for r in items)
        prefix = f"monotonicity_{role}_{sublayer}"
        if coords:
            coord_violations = sum(r["coord_violation_rate"] * r["n_coords"] for r in items)
            out[f"{prefix}_coord_violation_rate"] = coord_violations / coords
        if pairs:
            out[f"{prefix}_pair_violation_rate"] = sum(r["pair_violation_rate"] * r["n_pairs"] for r in items) / pairs
            out[f"{prefix}_n_pairs"] = pairs
        out[f"{prefix}_max_relative_drop"] = max(float(r.get("max_relative_drop", 0.0)) for r in items)
    return out


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    return float(value)


# add(stage, model, metric, value): record one number (anything that is not a number is skipped)
Add = Callable[[str, str | None, str, Any], None]


def _constrain_values(report: dict[str, Any], add: Add) -> None:
    """Stage 1's report.json: how much was constrained, the function drift, the smallest weight
    and the pooled monotonicity violation rates."""
    summary = report.get("summary") or {}
    for key in CONSTRAIN_KEYS:
        add("constrain", "monotonic", key, summary.get(key))
    for key, value in (report.get("drift") or {}).items():
        add("constrain", "monotonic", f"drift_{key}", value)
    add("constrain", "monotonic", "min_constrained_weight", report.get("min_constrained_weight"))
    add("constrain", "monotonic", "frozen_share", (report.get("frozen") or {}).get("frozen_share"))
    for key, value in monotonicity_rates(report.get("monotonicity") or []).items():
        add("constrain", "monotonic", key, value)


def _train_values(arm: str, stage: dict[str, Any], add: Add) -> None:
    """A training stage's manifest metrics: steps, tokens, lr, batch, final numbers, wall time."""
    name = f"train_{arm}"
    metrics = stage["metrics"]
    for key in TRAIN_KEYS:
        add(name, arm, key, metrics.get(key))
    for key, value in (metrics.get("final") or {}).items():
        add(name, arm, f"final_{key}", value)
    add(name, arm, "wall_time_s", stage.get("wall_time_s"))
    for when, rec in (metrics.get("frozen") or {}).items():  # the constrained arm: start and end
        add(name, arm, f"frozen_share_{when}", (rec or {}).get("frozen_share"))


def _evaluation_values(evaluation: dict[str, Any], add: Add) -> None:
    """Stage 4's evaluation.json: held-out quality of every model, the smallest constrained weight
    and the pooled monotonicity violation rates after training."""
    for model in MODELS:
        for key in EVAL_KEYS:
            add("evaluate", model, key, (evaluation.get("models") or {}).get(model, {}).get(key))
    add("evaluate", "monotonic", "min_constrained_weight", evaluation.get("min_constrained_weight"))
    for key, value in monotonicity_rates(evaluation.get("monotonicity") or []).items():
        add("evaluate", "monotonic", key, value)


def _attack_effects(attack: str, arm: str, prefix: str, rec: dict[str, Any], add: Add) -> None:
    """One arm's attack effects with their stage-computed intervals; `prefix` is "control_" for
    the random-candidate control."""
    for key in ATTACK_KEYS:
        add(attack, arm, prefix + key, rec.get(key))
        ci = rec.get(f"{key}_ci") or [None, None]
        add(attack, arm, f"{prefix}{key}_ci_low", ci[0])
        add(attack, arm, f"{prefix}{key}_ci_high", ci[1])
    add(attack, arm, prefix + "n_texts", rec.get("n"))


def _attack_values(attack: str, metrics: dict[str, Any], add: Add) -> None:
    """An attack stage's manifest metrics: effects per arm (and of its control), mean flips, and
    the transfer matrix (crafted on `source`, evaluated on `target`)."""
    blocks = (("", metrics.get("per_model")), ("control_", metrics.get("control")))
    for prefix, block in (*blocks, ("restart_mean_", metrics.get("restart_mean"))):
        for arm, rec in (block or {}).items():
            _attack_effects(attack, arm, prefix, rec, add)
    for arm, value in (metrics.get("mean_flips") or {}).items():
        add(attack, arm, "mean_flips", value)
    for source, row in (metrics.get("transfer") or {}).items():
        for target, value in row.items():
            add(attack, target, f"transfer_from_{source}", value)


def seed_values(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Every number of one seed as flat records {seed, stage, model, metric, value}. `model` is
    the arm (base/baseline/monotonic), None for a stage-level number (e.g. its wall time)."""
    seed = int(data["seed"])
    out: list[dict[str, Any]] = []

    def add(stage: str, model: str | None, metric: str, value: Any) -> None:
        number = _number(value)
        if number is not None:
            out.append({"seed": seed, "stage": stage, "model": model, "metric": metric, "value": number})

    stages = data.get("stages", {})
    if data.get("constrain"):
        _constrain_values(data["constrain"], add)
    for arm in ARMS:
        if f"train_{arm}" in stages:
            _train_values(arm, stages[f"train_{arm}"], add)
    if data.get("evaluation"):
        _evaluation_values(data["evaluation"], add)
    for attack in ATTACKS:
        if attack in stages:
            _attack_values(attack, stages[attack]["metrics"], add)
    for stage in ("setup", "constrain", "evaluate", *ATTACKS):
        if stage in stages:
            add(stage, None, "wall_time_s", stages[stage].get("wall_time_s"))
    return out


def value(results: dict[str, Any], seed: int, stage: str, model: str | None, metric: str) -> float | None:
    """One per-seed value from results.json's `values`, None when the seed has no such number."""
    for rec in results["values"]:
        if rec["seed"] == seed and rec["stage"] == stage and rec["model"] == model and rec["metric"] == metric:
            return rec["value"]
    return None
