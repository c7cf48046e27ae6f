"""Stage 4 — evaluate base, baseline and monotonic models on the same held-out documents: the
test part, disjoint from the validation part that selected each arm's checkpoint.

Perplexity is token-weighted and computed like lm-evaluation-harness (whole documents, disjoint
windows, predicted tokens only). The trained monotonic model's constrained weights are re-checked
(minimum materialized weight) and its sublayers' empirical monotonicity violation rate measured.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from monolm import constraints, evaluation, models, planning
from monolm import data as data_lib
from monolm.artifacts import atomic_write_json
from monolm.config import ExperimentConfig
from monolm.layout import CellPaths
from monolm.monotonicity import monotonicity_violation_rate
from monolm.progress import Progress
from monolm.runtime import generator, pick_device
from monolm.stages.common import Inputs, OnLog, StageRef, existing, finish, prepare
from monolm.stages.registry import TRAIN_STAGES
from monolm.stages.setup import load_setup, model_dir

STAGE = "evaluate"
log = logging.getLogger("monolm.stages")


def run(
    cfg: ExperimentConfig, cell: CellPaths, inputs: Inputs, *, progress: bool = True, on_log: OnLog | None = None
) -> StageRef:
    """Stage 4 on the base model (`inputs["setup"]`) and both trained arms."""
    done = existing(cfg, cell, STAGE, inputs)
    if done:
        return done
    started = time.time()
    setup = inputs["setup"]
    out = prepare(cfg, cell, STAGE, inputs)
    device = pick_device()
    tokenizer, splits = load_setup(setup)
    texts = splits.test[: cfg.evaluation.max_docs]  # never the validation part that selected best/
    docs = data_lib.tokenize(tokenizer, texts)
    paths = {
        "base": model_dir(setup),
        **{arm: Path(inputs[name].metrics["model_dir"]) for arm, name in TRAIN_STAGES.items()},
    }
    results: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    memory_plan = planning.plan_eval_stage(cfg, paths["base"], device)  # one model resident at a time
    tracker = Progress(len(paths), log=log, on_log=on_log, what="evaluate")
    for i, (name, path) in enumerate(paths.items()):
        model = models.load_model(path, device)
        results[name] = evaluation.perplexity(
            model,
            docs,
            seq_len=cfg.eval_seq_len,
            batch_size=memory_plan.chosen,
            prefix_token_id=tokenizer.eos_token_id,
            texts=texts,
            device=device,
            progress=progress,
            return_per_doc=True,
            bf16=cfg.evaluation.bf16,
        )
        if name == "monotonic":
            blocks = data_lib.pack_blocks(docs[:8], min(cfg.data.seq_len, 128), tokenizer.eos_token_id).to(device)
            extra["min_constrained_weight"] = constraints.min_constrained_weight(model)
            extra["monotonicity"] = monotonicity_violation_rate(
                model, cfg.constraint.monotonicity_pairs, generator(cell.seed, STAGE, "monotonicity"), inputs=blocks[:4]
            )
        del model
        tracker.update(
            i + 1,
            f"evaluate {name} ({i + 1}/{len(paths)}): perplexity {results[name]['token_perplexity']:.3f} "
            f"over {results[name].get('tokens', '?')} tokens",
        )
    report = {
        "models": results,
        "part": "test",
        "n_docs": len(docs),
        "window": {"seq_len": cfg.eval_seq_len, "prefix": "eos"},
        "recipe": cfg.training.recipe,
        **extra,
    }
    atomic_write_json(out / "evaluation.json", report)
    metrics = {
        f"{name}_{key}": r[key]
        for name, r in results.items()
        for key in ("token_perplexity", "loss", "bits_per_byte")
        if key in r
    }
    metrics["min_constrained_weight"] = extra["min_constrained_weight"]
    metrics["n_docs"] = len(docs)
    metrics["memory_plan"] = memory_plan.to_json()
    return finish(cfg, cell, STAGE, inputs=inputs, outputs=["evaluation.json"], metrics=metrics, started=started)
