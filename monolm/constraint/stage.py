"""Stage 1 — constrain: reparametrize the selected FFN weights as W = softplus(V) >= 0, convert the
pretrained weights into V by the configured rule, and report what that did to the model.

Honesty about "monotone": with GELU (negative slope below about -0.75), LayerNorm and residual
paths, non-negative weights do not make the FFN block monotone. The report measures how often the
constrained sublayers violate order on sampled input pairs instead of claiming monotonicity.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from monolm.config import ExperimentConfig
from monolm.constraint import softplus as constraints
from monolm.constraint.drift import function_drift
from monolm.constraint.frozen import frozen_share
from monolm.constraint.monotonicity import monotonicity_violation_rate
from monolm.core.artifacts import atomic_write_json
from monolm.core.runtime import generator, pick_device
from monolm.data import splits as data_lib
from monolm.data.stage import load_setup, model_dir
from monolm.models import loading as models
from monolm.study.frame import Inputs, OnLog, StageRef, files_under, framed
from monolm.study.layout import CellPaths

STAGE = "constrain"


def monotonicity_note(rows: list[dict[str, Any]]) -> str:
    """What the measured violation rates show, per sublayer kind: non-monotone where a sampled
    ordered input pair (x <= x') gave an out-of-order output, no violation found otherwise."""
    words = []
    for sublayer in dict.fromkeys(str(r.get("sublayer")) for r in rows):
        items = [r for r in rows if str(r.get("sublayer")) == sublayer]
        pairs = sum(r.get("n_pairs", 0) for r in items)
        bad = sum(r["pair_violation_rate"] * r.get("n_pairs", 0) for r in items)
        if bad > 0:
            share = f"{bad / pairs:.0%}"
            words.append(f"{sublayer}: out-of-order outputs in {share} of {pairs} sampled pairs (not monotone)")
        else:
            words.append(f"{sublayer}: no out-of-order output in {pairs} sampled pairs (not a proof of monotonicity)")
    return (
        "Non-negative weights make each constrained Linear map monotone; GELU (negative slope below about -0.75), "
        "LayerNorm and residual paths can break that for the enclosing block and the model. Measured on ordered "
        "input pairs (x <= x'): " + "; ".join(words) + "."
    )


def drift_blocks(cfg: ExperimentConfig, tokenizer, texts: list[str]) -> torch.Tensor:
    """Held-out text (the validation part) packed into blocks for the function-drift measurement."""
    docs = data_lib.tokenize(tokenizer, texts[: cfg.constraint.drift_docs])
    return data_lib.pack_blocks(docs, min(cfg.data.seq_len, 128), tokenizer.eos_token_id)


def run(
    cfg: ExperimentConfig, cell: CellPaths, inputs: Inputs, *, progress: bool = True, on_log: OnLog | None = None
) -> StageRef:
    """Stage 1 from stage 0's base model (`inputs["setup"]`)."""
    return framed(cfg, cell, STAGE, inputs, lambda out: _constrain(cfg, cell, inputs["setup"], out))


def _constrain(cfg: ExperimentConfig, cell: CellPaths, setup: StageRef, out: Path) -> tuple[list[str], dict[str, Any]]:
    """The constrained model and report.json in `out`; the stage's outputs and metrics."""
    device = pick_device()
    tokenizer, splits = load_setup(setup)
    base = models.load_model(model_dir(setup), device)
    constrained = models.load_model(model_dir(setup), device)
    summary = constraints.apply_constraint(
        constrained, cfg.constraint.variant, init=cfg.constraint.init, eps=cfg.constraint.eps
    )
    blocks = drift_blocks(cfg, tokenizer, splits.validation).to(device)
    drift = function_drift(base, constrained, blocks)
    monotonicity = monotonicity_violation_rate(
        constrained, cfg.constraint.monotonicity_pairs, generator(cell.seed, STAGE, "monotonicity"), inputs=blocks[:4]
    )
    del base
    constraints.save_constrained(constrained, tokenizer, out / "model", spec=cfg.constraint.model_dump(mode="json"))
    report: dict[str, Any] = {
        "variant": cfg.constraint.variant,
        "init": cfg.constraint.init,
        "summary": summary.to_json(),
        "drift": drift,
        "drift_part": "validation",
        "monotonicity": monotonicity,
        "min_constrained_weight": constraints.min_constrained_weight(constrained),
        "frozen": frozen_share(constrained),  # dW/dV below a bound: weights the init froze
        "note": monotonicity_note(monotonicity),
    }
    atomic_write_json(out / "report.json", report)
    metrics = {
        "constrained_modules": summary.n_modules,
        "share_of_params": summary.share_of_params,
        "frac_negative_before": summary.frac_negative_before,
        "drift": drift,
        "min_constrained_weight": report["min_constrained_weight"],
        "frozen_share": report["frozen"]["frozen_share"],
        "model_dir": str((out / "model").resolve()),
    }
    return ["report.json", *files_under(out, "model")], metrics
