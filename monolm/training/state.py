"""The loop's changing state, how it begins (a fresh start or a resume from the newest valid
checkpoint) and how it is checkpointed.

A checkpoint's `state.json` stores the train state as `{"step", "tokens_seen", "data_position",
"interval", "wall_time_s", "history"}`, `interval` being `Interval` as a plain dict; together with
the model, optimizer, scheduler and RNG states it is everything a resume needs to continue with
the very computation an uninterrupted run would have done.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from monolm.constraint.softplus import min_constrained_weight
from monolm.core.artifacts import atomic_write_json
from monolm.core.runtime import derive_seed, seed_everything
from monolm.training.best import read_best, replay_point_for_lost_best
from monolm.training.checkpoint import (
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    move_aside,
    save_checkpoint,
)
from monolm.training.run import TrainingRun
from monolm.training.schedule import DataOrder

log = logging.getLogger(__name__)


@dataclass
class Interval:
    """Running sums over the steps since the last logged one; a log entry reports their averages.
    Checkpointed, so a run resumed mid-interval logs the same averages as an uninterrupted one."""

    loss_sum: float = 0.0  # summed next-token loss
    targets: int = 0  # predicted tokens
    tokens: int = 0  # tokens fed
    steps: int = 0
    grad_norm_sum: float = 0.0  # pre-clip gradient norms
    seconds: float = 0.0  # wall-clock time of the steps (for tokens/s)
    min_w: float | None = None  # smallest constrained weight seen (constrained arm only)

    def add(
        self, loss_sum: float, grad_norm: float, min_w: float | None, *, targets: int, tokens: int, seconds: float
    ) -> None:
        if min_w is not None:
            self.min_w = min_w if self.min_w is None else min(self.min_w, min_w)
        self.loss_sum += loss_sum
        self.targets += targets
        self.tokens += tokens
        self.steps += 1
        self.grad_norm_sum += grad_norm
        self.seconds += seconds

    @property
    def train_loss(self) -> float:
        return self.loss_sum / self.targets

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    @property
    def grad_norm(self) -> float:
        return self.grad_norm_sum / self.steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Interval:
        return cls(**data)


@dataclass
class LoopState:
    """Where the loop is: steps and tokens done, data position, history, the running interval,
    and the wall-clock bookkeeping of this call."""

    step: int
    tokens_seen: int
    order: DataOrder
    history: dict[str, Any]
    interval: Interval
    wall_before: float  # training seconds of earlier calls, from the resumed checkpoint
    resumed_from: Path | None = None  # the checkpoint this call resumed from
    call_start: float = 0.0  # time.perf_counter() when this call's loop began
    last_checkpoint: float = 0.0  # time.monotonic() of the latest checkpoint (or loop start)

    @property
    def summary(self) -> dict[str, Any]:
        return self.history["summary"]

    def start_clocks(self) -> None:
        self.call_start = time.perf_counter()
        self.last_checkpoint = time.monotonic()

    def wall_time(self) -> float:
        """Training seconds so far, earlier calls included."""
        return self.wall_before + (time.perf_counter() - self.call_start)

    def record_step(
        self, loss_sum: float, grad_norm: float, min_w: float | None, *, sequences: int, seq_len: int, seconds: float
    ) -> None:
        """Count one finished optimizer step of `sequences` blocks of `seq_len` tokens."""
        self.step += 1
        self.tokens_seen += sequences * seq_len
        self.interval.add(
            loss_sum, grad_norm, min_w, targets=sequences * (seq_len - 1), tokens=sequences * seq_len, seconds=seconds
        )
        if min_w is not None:
            self.summary["min_constrained_weight"] = min(self.summary["min_constrained_weight"], min_w)
        self.summary.update(tokens_seen=self.tokens_seen, steps_done=self.step)

    def train_state(self) -> dict[str, Any]:
        """The train state a checkpoint stores in `state.json`."""
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "data_position": self.order.position,
            "interval": self.interval.to_dict(),
            "wall_time_s": self.wall_time(),
            "history": self.history,
        }


def _new_history(run: TrainingRun) -> dict[str, Any]:
    history = {
        "log": [],
        "eval": [],
        "summary": {
            "effective_batch_size": run.effective_batch,
            "micro_batch_size": run.arm.micro_batch_size,
            "grad_accum_steps": run.arm.grad_accum_steps,
            "seq_len": run.seq_len,
            "n_sequences": run.n_sequences,
            "total_steps": run.total_steps,
            "tokens_seen": 0,
            "steps_done": 0,
            "constrained": run.constrained,
            "seed": run.seed,
            "bf16_autocast": run.bf16,
            "best_step": None,
            "best_val_perplexity": None,
        },
        "resumes": [],
    }
    if run.constrained:
        history["summary"]["min_constrained_weight"] = min_constrained_weight(run.model)
    return history


def _fresh_start(run: TrainingRun) -> LoopState:
    """Seed the global RNGs (dropout) from the run's seed and start at step 0."""
    seed_everything(derive_seed(run.seed, "train"))
    order = DataOrder(run.n_sequences, run.seed)
    return LoopState(
        step=0, tokens_seen=0, order=order, history=_new_history(run), interval=Interval(), wall_before=0.0
    )


def _resume(run: TrainingRun, checkpoint: Path) -> LoopState:
    """Load model, optimizer, scheduler and RNG states from `checkpoint` and rebuild the state."""
    loaded = load_checkpoint(
        checkpoint,
        model=run.model,
        optimizer=run.optimizer,
        param_names=run.param_names,
        scheduler=run.scheduler,
        fingerprint=run.fingerprint,
    )
    st = loaded.state
    for step_no, path in list_checkpoints(run.checkpoint_root):  # newer ones were skipped as invalid
        if step_no > loaded.step:
            move_aside(path, f"not valid; resumed from {checkpoint.name} instead")
    order = DataOrder(run.n_sequences, run.seed, **st["data_position"])
    if loaded.data_generator_state is None or not torch.equal(order.generator_state, loaded.data_generator_state):
        raise RuntimeError(
            f"{checkpoint}: the data order would differ from the checkpointed run "
            "(data permutation generator state mismatch)"
        )
    history = st["history"]
    history.setdefault("resumes", []).append({"step": st["step"], "checkpoint": str(checkpoint)})
    log.info("resuming %s from %s (step %d/%d)", run.out_dir, checkpoint, st["step"], run.total_steps)
    return LoopState(
        step=st["step"],
        tokens_seen=st["tokens_seen"],
        order=order,
        history=history,
        interval=Interval.from_dict(st["interval"]),
        wall_before=st["wall_time_s"],
        resumed_from=checkpoint,
    )


def _reconcile_best(summary: dict[str, Any], best: dict[str, Any] | None, run: TrainingRun) -> None:
    """Make the history's best step agree with the best model actually on disk."""
    if best is not None:
        summary["best_step"] = best["step"]
        summary["best_val_perplexity"] = best["metrics"].get("val_perplexity")
    elif summary["best_step"] is not None:
        log.warning(
            "history records best step %s but %s is missing or invalid; best model selection "
            "restarts from the next evaluation",
            summary["best_step"],
            run.best_dir,
        )
        summary["best_step"] = summary["best_val_perplexity"] = None


def start_or_resume(run: TrainingRun) -> LoopState:
    """Resume from the newest valid checkpoint (or, when the selected best model was lost, from the
    one before its step, to recreate it exactly), else start fresh."""
    latest = latest_valid_checkpoint(run.checkpoint_root)
    best = read_best(run.out_dir, run.fingerprint_digest)
    if latest is not None and best is None and run.evaluate is not None:
        latest = replay_point_for_lost_best(run.out_dir, run.checkpoint_root, latest, run.fingerprint)
    state = _resume(run, latest) if latest is not None else _fresh_start(run)
    _reconcile_best(state.summary, best, run)
    if latest is not None:  # drop entries a lost attempt wrote after the resumed checkpoint
        atomic_write_json(run.history_path, state.history)
    return state


def checkpoint_due(run: TrainingRun, state: LoopState, stop_at: int) -> bool:
    """Every `checkpoint_every_steps` steps, after `checkpoint_every_minutes`, and at the stop."""
    due_minutes = (time.monotonic() - state.last_checkpoint) / 60.0 >= run.arm.checkpoint_every_minutes
    return state.step % run.arm.checkpoint_every_steps == 0 or due_minutes or state.step == stop_at


def save_loop_checkpoint(run: TrainingRun, state: LoopState) -> None:
    """Checkpoint model, optimizer, scheduler, RNG and train state at the current step."""
    save_checkpoint(
        run.checkpoint_root,
        state.step,
        model=run.model,
        optimizer=run.optimizer,
        param_names=run.param_names,
        scheduler=run.scheduler,
        state=state.train_state(),
        fingerprint=run.fingerprint,
        data_generator_state=state.order.generator_state,
        keep_last=run.arm.keep_last_checkpoints,
    )
    state.last_checkpoint = time.monotonic()
