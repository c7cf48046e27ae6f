"""`train()`: set the run up, start or resume, then step, log, evaluate and keep the best, and
checkpoint, until the budget (or this call's share of it) is done."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from monolm.config import ArmConfig
from monolm.constraint.softplus import ConstraintViolation
from monolm.core.artifacts import atomic_write_json
from monolm.core.deadline import check_deadline
from monolm.core.progress import eta_seconds, format_eta
from monolm.core.runtime import eval_mode
from monolm.training.best import SaveModel, read_best, save_best
from monolm.training.run import Callbacks, Evaluate, OnLog, TrainingRun, prepare_run
from monolm.training.state import Interval, LoopState, checkpoint_due, save_loop_checkpoint, start_or_resume
from monolm.training.step import TrainingDiverged, training_step

log = logging.getLogger(__name__)

# The fields of a history log entry that measure wall-clock time, not the computation.
WALL_CLOCK_FIELDS = ("tokens_per_s", "wall_time_s")


@dataclass
class TrainResult:
    """What one call of `train()` did and where it left the history and the best model."""

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
    on_log: OnLog | None = None,
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
    callbacks = Callbacks(evaluate, save_model, on_log)
    run = prepare_run(model, train_blocks, arm, out_dir, seed, constrained, device, callbacks)
    state = start_or_resume(run)
    first_step = state.step  # for the ETA: steps reused from a checkpoint do not count as speed
    total = run.total_steps
    stop_at = total if max_steps_this_call is None else min(total, state.step + max_steps_this_call)
    state.start_clocks()

    if evaluate is not None and state.step == 0 and not state.history["eval"]:
        evaluate_start(run, state)
    model.train()
    bar = _progress_bar(run, state, progress)
    try:
        while state.step < stop_at:
            check_deadline("between training steps")
            _step_and_record(run, state, stop_at, bar, first_step)
            bar.update(1)
    finally:
        bar.close()
    return _finish(run, state)


def _step_and_record(run: TrainingRun, state: LoopState, stop_at: int, bar: tqdm, first_step: int) -> None:
    """One optimizer step, then what its step number calls for: a log line, an evaluation (and
    `best/`), the final model as best without an evaluation, the history file, a checkpoint."""
    lr = take_step(run, state)
    step, total, arm = state.step, run.total_steps, run.arm
    history_changed = False

    if step % arm.log_every_steps == 0 or step == total:
        log_step(run, state, lr, bar, first_step)
        history_changed = True
    if run.evaluate is not None and (step % arm.eval_every_steps == 0 or step == total):
        evaluate_and_keep_best(run, state, first_step)
        history_changed = True
    if run.evaluate is None and step == total:
        keep_final_as_best(run, state)
        history_changed = True

    if history_changed:
        atomic_write_json(run.history_path, state.history)
    if checkpoint_due(run, state, stop_at):
        save_loop_checkpoint(run, state)


def _label(run: TrainingRun) -> str:
    return "train (constrained)" if run.constrained else "train"


def _progress_fields(run: TrainingRun, state: LoopState, first_step: int) -> dict[str, Any]:
    """What an `on_log` consumer needs to show progress: the fraction done and the time left."""
    eta = eta_seconds(state.step, run.total_steps, time.perf_counter() - state.call_start, first_step)
    return {"total_steps": run.total_steps, "fraction": state.step / max(run.total_steps, 1), "eta_s": eta}


def _progress_bar(run: TrainingRun, state: LoopState, progress: bool) -> tqdm:
    return tqdm(
        total=run.total_steps,
        initial=state.step,
        disable=None if progress else True,
        desc=_label(run),
        unit="step",
        dynamic_ncols=True,
    )


def take_step(run: TrainingRun, state: LoopState) -> float:
    """One optimizer step on the next batch of the data order; returns the learning rate it used."""
    t0 = time.perf_counter()
    batch = run.train_blocks[state.order.take(run.effective_batch)]
    lr = run.scheduler.get_last_lr()[0]
    try:
        loss_sum, grad_norm, min_w = training_step(
            run.model, run.optimizer, run.scheduler, batch, run.arm, constrained=run.constrained, bf16=run.bf16
        )
    except (ConstraintViolation, TrainingDiverged) as exc:
        raise type(exc)(f"optimizer step {state.step + 1}: {exc}") from None
    state.record_step(
        loss_sum, grad_norm, min_w, sequences=run.effective_batch, seq_len=run.seq_len, seconds=time.perf_counter() - t0
    )
    return lr


def log_step(run: TrainingRun, state: LoopState, lr: float, bar: tqdm, first_step: int = 0) -> None:
    """Append the averages of the interval that ends at this step to the history, log them as one
    line (step/total, loss, lr, tokens/s, ETA) and hand them to `on_log`; start a new interval."""
    interval = state.interval
    entry = {
        "step": state.step,
        "epoch": state.order.epochs_done,
        "lr": lr,
        "train_loss": interval.train_loss,
        "tokens_seen": state.tokens_seen,
        "tokens_per_s": interval.tokens_per_s,
        "wall_time_s": state.wall_time(),
        "grad_norm": interval.grad_norm,
    }
    if run.constrained:
        entry["min_constrained_weight"] = interval.min_w
    state.history["log"].append(entry)
    fields = _progress_fields(run, state, first_step)
    message = (
        f"{_label(run)} step {state.step}/{run.total_steps}: loss {entry['train_loss']:.4f}, lr {lr:.3g}, "
        f"{entry['tokens_per_s']:,.0f} tokens/s, ETA {format_eta(fields['eta_s'])}"
    )
    log.info("%s", message)
    run.emit("train", {**entry, **fields, "message": message})
    bar.set_postfix(loss=f"{entry['train_loss']:.4f}", tok_s=f"{entry['tokens_per_s']:.0f}")
    state.interval = Interval()


def evaluate_and_keep_best(run: TrainingRun, state: LoopState, first_step: int = 0) -> None:
    """Evaluate, record the metrics, and save the model as `best/` if its perplexity is the lowest;
    log the result as one line and hand it to `on_log`."""
    metrics = _run_eval(run.model, run.evaluate, run.constrained)
    entry = {"step": state.step, **metrics}
    state.history["eval"].append(entry)
    ppl = metrics["val_perplexity"]
    summary = state.summary
    best = summary["best_val_perplexity"] is None or ppl < summary["best_val_perplexity"]
    best_note = "new best" if best else f"best {summary['best_val_perplexity']:.3f} at step {summary['best_step']}"
    message = f"{_label(run)} eval at step {state.step}/{run.total_steps}: val perplexity {ppl:.3f} ({best_note})"
    log.info("%s", message)
    run.emit("eval", {**entry, **_progress_fields(run, state, first_step), "message": message})
    if best:
        save_best(
            run.out_dir,
            run.model,
            run.save_model,
            step=state.step,
            metrics=metrics,
            fingerprint_digest=run.fingerprint_digest,
        )
        summary.update(best_step=state.step, best_val_perplexity=ppl)


def evaluate_start(run: TrainingRun, state: LoopState) -> None:
    """Evaluate the starting model (step 0) so the training curve starts where training did (the
    base model, or the constrained initialisation). It is recorded and shown, but never a
    candidate for `best/`: the selected model is always a trained one."""
    metrics = _run_eval(run.model, run.evaluate, run.constrained)
    entry = {"step": 0, **metrics}
    state.history["eval"].append(entry)
    message = f"{_label(run)} eval at step 0/{run.total_steps}: val perplexity {metrics['val_perplexity']:.3f} (start)"
    log.info("%s", message)
    run.emit("eval", {**entry, "total_steps": run.total_steps, "fraction": 0.0, "eta_s": None, "message": message})


def keep_final_as_best(run: TrainingRun, state: LoopState) -> None:
    """Without an evaluation the final model is the best one."""
    save_best(
        run.out_dir, run.model, run.save_model, step=state.step, metrics={}, fingerprint_digest=run.fingerprint_digest
    )
    state.summary.update(best_step=state.step, best_val_perplexity=None)


def _finish(run: TrainingRun, state: LoopState) -> TrainResult:
    """Make sure a finished run has a best model, write the history a last time, and report."""
    completed = state.step >= run.total_steps
    if completed and read_best(run.out_dir, run.fingerprint_digest) is None:
        if run.evaluate is None:  # a finished run whose best/ was deleted or damaged: the final model is the best
            keep_final_as_best(run, state)
        else:
            log.warning("%s: training finished but no valid best model exists", run.out_dir)
    atomic_write_json(run.history_path, state.history)
    return TrainResult(
        history_path=run.history_path,
        best_dir=run.best_dir,
        final_metrics=_final_metrics(state.history),
        steps=state.step,
        total_steps=run.total_steps,
        tokens_seen=state.tokens_seen,
        effective_batch_size=run.effective_batch,
        resumed_from=state.resumed_from,
        completed=completed,
        history=state.history,
    )


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


def _run_eval(model: nn.Module, evaluate: Evaluate, constrained: bool) -> dict[str, Any]:
    """Call `evaluate` in eval mode without autograd (softplus cached once for the whole pass)."""
    cache = parametrize.cached() if constrained else contextlib.nullcontext()
    with eval_mode(model), torch.no_grad(), cache:
        raw = evaluate(model)
    if "perplexity" not in raw:
        raise KeyError(f"evaluate() must return 'perplexity' (best-model selection uses it); got {sorted(raw)}")
    metrics = {
        f"val_{k}": (float(v) if isinstance(v, (int, float)) or hasattr(v, "item") else v) for k, v in raw.items()
    }
    if not math.isfinite(metrics["val_perplexity"]):
        log.warning("validation perplexity is %s", metrics["val_perplexity"])
    return metrics
