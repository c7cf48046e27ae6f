"""Stage 4 — evaluate base, baseline and monotonic models on the same held-out documents: the
test part, disjoint from the validation part that selected each arm's checkpoint. The base model
and the baseline are evaluated once per (model, seed) (`evaluate_baseline`, shared by every cell
of the grid); each cell evaluates its constrained arm and writes all three into one file.

Perplexity is token-weighted and computed like lm-evaluation-harness (whole documents, disjoint
windows, predicted tokens only). The trained monotonic model's constrained weights are re-checked
(minimum materialized weight) and its sublayers' empirical monotonicity violation rate measured.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from monolm.config import ExperimentConfig
from monolm.constraint import softplus as constraints
from monolm.constraint.monotonicity import monotonicity_violation_rate
from monolm.core.artifacts import atomic_write_json
from monolm.core.progress import Progress
from monolm.core.runtime import generator, pick_device
from monolm.data import splits as data_lib
from monolm.data.stage import load_setup, model_dir
from monolm.evaluation.held_out import perplexity_on_test
from monolm.memory import plans as planning
from monolm.models import loading as models
from monolm.study.frame import Inputs, OnLog, StageRef, framed, read_output
from monolm.study.layout import CellPaths

STAGE = "evaluate"
BASELINE_STAGE = "evaluate_baseline"
log = logging.getLogger("monolm.stages")


def run_baseline(
    cfg: ExperimentConfig, cell: CellPaths, inputs: Inputs, *, progress: bool = True, on_log: OnLog | None = None
) -> StageRef:
    """Stage 4's share that does not depend on the constraint: the base model and the baseline
    arm, once per (model, seed) for every cell of the grid."""
    paths = {"base": model_dir(inputs["setup"]), "baseline": Path(inputs["train_baseline"].metrics["model_dir"])}
    return _evaluate(cfg, cell, BASELINE_STAGE, inputs, paths, progress=progress, on_log=on_log)


def run(
    cfg: ExperimentConfig, cell: CellPaths, inputs: Inputs, *, progress: bool = True, on_log: OnLog | None = None
) -> StageRef:
    """Stage 4 of a cell: the constrained arm on the same test documents, its constrained weights
    re-checked and its sublayers' monotonicity violation rate measured; with the base model's and
    the baseline's results (`inputs["evaluate_baseline"]`) in one evaluation.json."""
    paths = {"monotonic": Path(inputs["train_monotonic"].metrics["model_dir"])}
    return _evaluate(cfg, cell, STAGE, inputs, paths, progress=progress, on_log=on_log)


def _evaluate(
    cfg: ExperimentConfig,
    cell: CellPaths,
    stage: str,
    inputs: Inputs,
    paths: dict[str, Path],
    *,
    progress: bool,
    on_log: OnLog | None,
) -> StageRef:
    def compute(out: Path) -> tuple[list[str], dict[str, Any]]:
        return _write_evaluation(cfg, cell, stage, inputs, paths, out, progress=progress, on_log=on_log)

    return framed(cfg, cell, stage, inputs, compute)


def _write_evaluation(cfg, cell, stage, inputs, paths, out: Path, *, progress, on_log):
    """evaluation.json in `out` (with the shared base and baseline results in the cell's stage),
    and the stage's outputs and metrics."""
    setup = inputs["setup"]
    device = pick_device()
    tokenizer, splits = load_setup(setup)
    texts = splits.test[: cfg.evaluation.max_docs]  # never the validation part that selected best/
    docs = data_lib.tokenize(tokenizer, texts)
    memory_plan = planning.plan_eval_stage(cfg, model_dir(setup), device, name=stage)  # one model at a time
    results, extra = _perplexities(
        cfg, cell.seed, paths, docs, texts, tokenizer, memory_plan.chosen, device, progress=progress, on_log=on_log
    )
    if BASELINE_STAGE in inputs:  # the cell's stage: one evaluation.json with every model
        shared = read_output(inputs[BASELINE_STAGE], "evaluation.json")
        results = {**shared["models"], **results}
    report = {
        "models": results,
        "part": "test",
        "n_docs": len(docs),
        "window": {"seq_len": cfg.eval_seq_len, "prefix": "eos"},
        "recipe": cfg.training.recipe,
        **{k: v for k, v in extra.items() if k != "metrics"},
    }
    atomic_write_json(out / "evaluation.json", report)
    metrics = {
        f"{name}_{key}": r[key]
        for name, r in results.items()
        for key in ("token_perplexity", "loss", "bits_per_byte")
        if key in r
    }
    metrics.update(extra.get("metrics", {}))
    metrics["n_docs"] = len(docs)
    metrics["memory_plan"] = memory_plan.to_json()
    return ["evaluation.json"], metrics


def _perplexities(cfg, seed, paths, docs, texts, tokenizer, batch_size, device, *, progress, on_log):
    """Each model's perplexity on the test documents (one model on the device at a time), and
    for the constrained arm its minimum constrained weight and monotonicity violation rates."""
    results: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    tracker = Progress(len(paths), log=log, on_log=on_log, what="evaluate")
    for i, (name, path) in enumerate(paths.items()):
        model = models.load_model(path, device)
        results[name] = perplexity_on_test(
            cfg, model, tokenizer, docs, texts, batch_size=batch_size, device=device, progress=progress
        )
        if name == "monotonic":
            blocks = data_lib.pack_blocks(docs[:8], min(cfg.data.seq_len, 128), tokenizer.eos_token_id).to(device)
            extra["min_constrained_weight"] = constraints.min_constrained_weight(model)
            extra["monotonicity"] = monotonicity_violation_rate(
                model, cfg.constraint.monotonicity_pairs, generator(seed, STAGE, "monotonicity"), inputs=blocks[:4]
            )
            extra["metrics"] = {"min_constrained_weight": extra["min_constrained_weight"]}
        del model
        tracker.update(
            i + 1,
            f"evaluate {name} ({i + 1}/{len(paths)}): perplexity {results[name]['token_perplexity']:.3f} "
            f"over {results[name].get('tokens', '?')} tokens",
        )
    return results, extra
