"""The training loop: resume or start, step, log, evaluate and keep the best, checkpoint."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from monolm.artifacts import atomic_write_json
from monolm.checkpoint import (
    digest_json,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    make_fingerprint,
    move_aside,
    save_checkpoint,
)
from monolm.config import ArmConfig
from monolm.constraints import ConstraintViolation, constrained_modules, min_constrained_weight
from monolm.runtime import derive_seed, pick_device, resolve_flag, seed_everything
from monolm.training.best import (
    BEST_DIR,
    SaveModel,
    default_save_model,
    read_best,
    replay_point_for_lost_best,
    save_best,
)
from monolm.training.schedule import DataOrder, total_steps_for
from monolm.training.step import (
    TrainingDiverged,
    build_optimizer,
    enable_gradient_checkpointing,
    ensure_fp32,
    training_step,
)

log = logging.getLogger(__name__)

HISTORY_FILE = "history.json"
CHECKPOINTS_DIR = "checkpoints"
# Arm fields that only decide *when* checkpoints are written; changing them must not block a resume.
_CADENCE_FIELDS = {"checkpoint_every_steps", "checkpoint_every_minutes", "keep_last_checkpoints"}
WALL_CLOCK_FIELDS = ("tokens_per_s", "wall_time_s")

Evaluate = Callable[[nn.Module], dict]


@dataclass
class TrainResult:
    history_path: Path
    best_dir: Path
    final_metrics: dict[str, Any]
    steps: int  # optimizer steps completed so far (== total_steps when completed)
    total_steps: int
    tokens_seen: int
    effective_batch_size: int
    resumed_from: Path | None  # the checkpoint this call resumed from
    completed: bool  # False when stopped early by `max_steps_this_call`
    history: dict[str, Any] = field(repr=False, default_factory=dict)


def _data_digest(blocks: torch.Tensor) -> str:
    return hashlib.sha256(blocks.contiguous().numpy().tobytes()).hexdigest()


# --------------------------------------------------------------------------- the loop
def _new_interval() -> dict[str, Any]:
    return {"loss_sum": 0.0, "targets": 0, "tokens": 0, "steps": 0, "grad_norm_sum": 0.0,
            "seconds": 0.0, "min_w": None}


def _final_metrics(history: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if history["log"]:
        out["train_loss"] = history["log"][-1]["train_loss"]
    if history["eval"]:
        out.update({k: v for k, v in history["eval"][-1].items() if k != "step"})
    s = history["summary"]
    out.update(best_step=s["best_step"], best_val_perplexity=s["best_val_perplexity"])
    if "min_constrained_weight" in s:
        out["min_constrained_weight"] = s["min_constrained_weight"]
    return out


def train(
    model: nn.Module,
    train_blocks: torch.LongTensor,
    arm: ArmConfig,
    out_dir: Path,
    *,
    seed: int,
    evaluate: Evaluate | None,
    constrained: bool = False,
    device: torch.device | str | None = None,
    progress: bool = True,
    on_log: Callable[[dict], None] | None = None,
    save_model: SaveModel | None = None,
    max_steps_this_call: int | None = None,
) -> TrainResult:
    """Train `model` on `train_blocks` [N, T] with the recipe `arm`, resuming from the newest valid
    checkpoint in `out_dir/checkpoints` if there is one.

    `evaluate(model)` (run under `torch.no_grad()`, model in eval mode) returns at least
    `{"perplexity": ..., "loss": ...}` on held-out data; `best/` holds the model with the lowest
    validation perplexity (the final model when `evaluate` is None), written by `save_model(model,
    dir) -> [files]` (default: the state_dict as `model.safetensors`). `max_steps_this_call` stops
    after that many steps with a checkpoint (a worker draining before its walltime, and the
    resume tests). Writes `out_dir/history.json` atomically at every log/eval.

    A fresh start seeds the global Python/NumPy/torch RNGs (dropout) from `derive_seed(seed,
    "train")`; a resume restores them, the optimizer, scheduler and data position from the
    checkpoint, so the continuation is the same computation as an uninterrupted run.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else pick_device()
    save_model = save_model or default_save_model
    if train_blocks.dtype != torch.long or train_blocks.ndim != 2 or train_blocks.shape[1] < 2:
        raise ValueError(f"train_blocks must be a LongTensor [N, T>=2], got {train_blocks.dtype} "
                         f"{list(train_blocks.shape)}")
    n_seq, seq_len = train_blocks.shape
    train_blocks = train_blocks.cpu()
    has_constraint = bool(constrained_modules(model))
    if constrained != has_constraint:
        raise ValueError(
            f"constrained={constrained} but the model "
            f"{'has' if has_constraint else 'has no'} parametrized weights; wrong model for this arm?"
        )

    ensure_fp32(model)
    model.to(device)
    use_amp = resolve_flag(arm.bf16, device)
    if resolve_flag(arm.gradient_checkpointing, device):
        enable_gradient_checkpointing(model)

    eff = arm.effective_batch_size
    total_steps = total_steps_for(arm, n_seq)
    param_names, optimizer, scheduler = build_optimizer(model, arm, total_steps)
    fingerprint = make_fingerprint(
        model,
        config={k: v for k, v in arm.model_dump(mode="json").items() if k not in _CADENCE_FIELDS},
        run={"seed": seed, "constrained": constrained, "data_shape": [n_seq, seq_len],
             "data_sha256": _data_digest(train_blocks), "total_steps": total_steps},
    )
    fp_digest = digest_json(fingerprint)
    ckpt_root = out_dir / CHECKPOINTS_DIR

    # ------------------------------------------------------------------ fresh start or resume
    latest = latest_valid_checkpoint(ckpt_root)
    best = read_best(out_dir, fp_digest)
    if latest is not None and best is None and evaluate is not None:
        latest = replay_point_for_lost_best(out_dir, ckpt_root, latest, fingerprint)
    if latest is not None:
        loaded = load_checkpoint(latest, model=model, optimizer=optimizer, param_names=param_names,
                                 scheduler=scheduler, fingerprint=fingerprint)
        st = loaded.state
        for step_no, path in list_checkpoints(ckpt_root):  # newer ones were skipped as invalid
            if step_no > loaded.step:
                move_aside(path, f"not valid; resumed from {latest.name} instead")
        order = DataOrder(n_seq, seed, **st["data_position"])
        if loaded.data_generator_state is None or not torch.equal(order.generator_state, loaded.data_generator_state):
            raise RuntimeError(f"{latest}: the data order would differ from the checkpointed run "
                               "(data permutation generator state mismatch)")
        step, tokens_seen, history = st["step"], st["tokens_seen"], st["history"]
        interval, wall_before = st["interval"], st["wall_time_s"]
        history.setdefault("resumes", []).append({"step": step, "checkpoint": str(latest)})
        log.info("resuming %s from %s (step %d/%d)", out_dir, latest, step, total_steps)
    else:
        seed_everything(derive_seed(seed, "train"))
        order = DataOrder(n_seq, seed)
        step, tokens_seen, interval, wall_before = 0, 0, _new_interval(), 0.0
        history = {
            "log": [],
            "eval": [],
            "summary": {
                "effective_batch_size": eff, "micro_batch_size": arm.micro_batch_size,
                "grad_accum_steps": arm.grad_accum_steps, "seq_len": seq_len, "n_sequences": n_seq,
                "total_steps": total_steps, "tokens_seen": 0, "steps_done": 0, "constrained": constrained,
                "seed": seed, "bf16_autocast": use_amp, "best_step": None, "best_val_perplexity": None,
            },
            "resumes": [],
        }
        if constrained:
            history["summary"]["min_constrained_weight"] = min_constrained_weight(model)

    summary = history["summary"]
    if best is not None:
        summary["best_step"] = best["step"]
        summary["best_val_perplexity"] = best["metrics"].get("val_perplexity")
    elif summary["best_step"] is not None:
        log.warning("history records best step %s but %s is missing or invalid; best model selection "
                    "restarts from the next evaluation", summary["best_step"], out_dir / BEST_DIR)
        summary["best_step"] = summary["best_val_perplexity"] = None

    history_path = out_dir / HISTORY_FILE
    if latest is not None:  # drop entries a lost attempt wrote after the resumed checkpoint
        atomic_write_json(history_path, history)
    stop_at = total_steps if max_steps_this_call is None else min(total_steps, step + max_steps_this_call)
    call_start = time.perf_counter()
    last_ckpt = time.monotonic()

    def wall() -> float:
        return wall_before + (time.perf_counter() - call_start)

    def train_state() -> dict[str, Any]:
        return {"step": step, "tokens_seen": tokens_seen, "data_position": order.position,
                "interval": interval, "wall_time_s": wall(), "history": history}

    def emit(kind: str, entry: dict[str, Any]) -> None:
        if on_log is not None:
            on_log({"kind": kind, **entry})

    model.train()
    bar = tqdm(total=total_steps, initial=step, disable=None if progress else True,
               desc="train (constrained)" if constrained else "train", unit="step", dynamic_ncols=True)
    try:
        while step < stop_at:
            t0 = time.perf_counter()
            batch = train_blocks[order.take(eff)]
            lr = scheduler.get_last_lr()[0]
            try:
                loss_value, norm_value, mw = training_step(model, optimizer, scheduler, batch, arm,
                                                           constrained=constrained, use_amp=use_amp)
            except (ConstraintViolation, TrainingDiverged) as exc:
                raise type(exc)(f"optimizer step {step + 1}: {exc}") from None
            step += 1
            tokens_seen += eff * seq_len
            if constrained:
                interval["min_w"] = mw if interval["min_w"] is None else min(interval["min_w"], mw)
                summary["min_constrained_weight"] = min(summary["min_constrained_weight"], mw)
            interval["loss_sum"] += loss_value
            interval["targets"] += eff * (seq_len - 1)
            interval["tokens"] += eff * seq_len
            interval["steps"] += 1
            interval["grad_norm_sum"] += norm_value
            interval["seconds"] += time.perf_counter() - t0
            summary.update(tokens_seen=tokens_seen, steps_done=step)
            touched = False

            if step % arm.log_every_steps == 0 or step == total_steps:
                entry = {
                    "step": step,
                    "epoch": order.epochs_done,
                    "lr": lr,
                    "train_loss": interval["loss_sum"] / interval["targets"],
                    "tokens_seen": tokens_seen,
                    "tokens_per_s": interval["tokens"] / max(interval["seconds"], 1e-9),
                    "wall_time_s": wall(),
                    "grad_norm": interval["grad_norm_sum"] / interval["steps"],
                }
                if constrained:
                    entry["min_constrained_weight"] = interval["min_w"]
                history["log"].append(entry)
                emit("train", entry)
                bar.set_postfix(loss=f"{entry['train_loss']:.4f}", tok_s=f"{entry['tokens_per_s']:.0f}")
                interval = _new_interval()
                touched = True

            if evaluate is not None and (step % arm.eval_every_steps == 0 or step == total_steps):
                metrics = _run_eval(model, evaluate, constrained)
                entry = {"step": step, **metrics}
                history["eval"].append(entry)
                emit("eval", entry)
                ppl = metrics["val_perplexity"]
                if summary["best_val_perplexity"] is None or ppl < summary["best_val_perplexity"]:
                    save_best(out_dir, model, save_model, step=step, metrics=metrics, fingerprint_digest=fp_digest)
                    summary.update(best_step=step, best_val_perplexity=ppl)
                touched = True

            if evaluate is None and step == total_steps:
                save_best(out_dir, model, save_model, step=step, metrics={}, fingerprint_digest=fp_digest)
                summary.update(best_step=step, best_val_perplexity=None)
                touched = True

            if touched:
                atomic_write_json(history_path, history)
            due_minutes = (time.monotonic() - last_ckpt) / 60.0 >= arm.checkpoint_every_minutes
            if step % arm.checkpoint_every_steps == 0 or due_minutes or step == stop_at:
                save_checkpoint(ckpt_root, step, model=model, optimizer=optimizer, param_names=param_names,
                                scheduler=scheduler, state=train_state(), fingerprint=fingerprint,
                                data_generator_state=order.generator_state, keep_last=arm.keep_last_checkpoints)
                last_ckpt = time.monotonic()
            bar.update(1)
    finally:
        bar.close()

    completed = step >= total_steps
    if completed and read_best(out_dir, fp_digest) is None:
        if evaluate is None:  # a finished run whose best/ was deleted or damaged: the final model is the best
            save_best(out_dir, model, save_model, step=step, metrics={}, fingerprint_digest=fp_digest)
            summary.update(best_step=step, best_val_perplexity=None)
        else:
            log.warning("%s: training finished but no valid best model exists", out_dir)
    atomic_write_json(history_path, history)
    return TrainResult(
        history_path=history_path,
        best_dir=out_dir / BEST_DIR,
        final_metrics=_final_metrics(history),
        steps=step,
        total_steps=total_steps,
        tokens_seen=tokens_seen,
        effective_batch_size=eff,
        resumed_from=latest,
        completed=completed,
        history=history,
    )


def _run_eval(model: nn.Module, evaluate: Evaluate, constrained: bool) -> dict[str, Any]:
    """Call `evaluate` in eval mode without autograd (softplus cached once for the whole pass)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), (parametrize.cached() if constrained else contextlib.nullcontext()):
            raw = evaluate(model)
    finally:
        model.train(was_training)
    if "perplexity" not in raw:
        raise KeyError(f"evaluate() must return 'perplexity' (best-model selection uses it); got {sorted(raw)}")
    metrics = {f"val_{k}": (float(v) if isinstance(v, (int, float)) or hasattr(v, "item") else v)
               for k, v in raw.items()}
    if not math.isfinite(metrics["val_perplexity"]):
        log.warning("validation perplexity is %s", metrics["val_perplexity"])
    return metrics


def load_history(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
