"""Setting a run up: check the inputs, prepare the model (fp32, device, gradient checkpointing),
build the optimizer and schedule, and fingerprint the run so a checkpoint of another model,
recipe or data set is never resumed. The result, `TrainingRun`, is what stays fixed for the
whole call; the loop's changing state lives in `monolm.training.state`."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monolm.config import ArmConfig
from monolm.constraint.softplus import constrained_modules
from monolm.core.runtime import pick_device, resolve_flag
from monolm.training.best import BEST_DIR, SaveModel, default_save_model
from monolm.training.checkpoint import digest_json, make_fingerprint
from monolm.training.schedule import total_steps_for
from monolm.training.step import build_optimizer, enable_gradient_checkpointing, ensure_fp32

HISTORY_FILE = "history.json"
CHECKPOINTS_DIR = "checkpoints"
# Arm fields that only decide *when* checkpoints are written, or how the effective batch is split
# into micro-batches (the memory plan picks that per card); changing them must not block a resume.
_CADENCE_FIELDS = {
    "checkpoint_every_steps",
    "checkpoint_every_minutes",
    "keep_last_checkpoints",
    "micro_batch_size",
    "grad_accum_steps",
}

Evaluate = Callable[[nn.Module], dict]
OnLog = Callable[[dict], None]


@dataclass(frozen=True, eq=False)
class TrainingRun:
    """What stays fixed during one call of `train()`: model, optimizer, data, recipe, callbacks
    and where the run writes."""

    model: nn.Module
    train_blocks: torch.Tensor  # [N, T] LongTensor on the CPU
    arm: ArmConfig
    out_dir: Path
    seed: int
    constrained: bool
    bf16: bool  # autocast compute in bf16 (resolved from the arm's `bf16` setting and the device)
    total_steps: int
    param_names: list[str]  # in optimizer order, as checkpoints record them
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    fingerprint: dict[str, Any]
    fingerprint_digest: str
    evaluate: Evaluate | None
    save_model: SaveModel
    on_log: OnLog | None

    @property
    def n_sequences(self) -> int:
        return self.train_blocks.shape[0]

    @property
    def seq_len(self) -> int:
        return self.train_blocks.shape[1]

    @property
    def effective_batch(self) -> int:
        return self.arm.effective_batch_size

    @property
    def history_path(self) -> Path:
        return self.out_dir / HISTORY_FILE

    @property
    def checkpoint_root(self) -> Path:
        return self.out_dir / CHECKPOINTS_DIR

    @property
    def best_dir(self) -> Path:
        return self.out_dir / BEST_DIR

    def emit(self, kind: str, entry: dict[str, Any]) -> None:
        """Hand a history entry to the `on_log` callback, tagged with its kind ("train"/"eval")."""
        if self.on_log is not None:
            self.on_log({"kind": kind, **entry})


def check_inputs(model: nn.Module, train_blocks: torch.Tensor, constrained: bool) -> None:
    """Refuse data that is not a LongTensor [N, T>=2], and a model that does not match its arm."""
    if train_blocks.dtype != torch.long or train_blocks.ndim != 2 or train_blocks.shape[1] < 2:
        raise ValueError(
            f"train_blocks must be a LongTensor [N, T>=2], got {train_blocks.dtype} {list(train_blocks.shape)}"
        )
    has_constraint = bool(constrained_modules(model))
    if constrained != has_constraint:
        raise ValueError(
            f"constrained={constrained} but the model "
            f"{'has' if has_constraint else 'has no'} parametrized weights; wrong model for this arm?"
        )


def _data_digest(blocks: torch.Tensor) -> str:
    return hashlib.sha256(blocks.contiguous().numpy().tobytes()).hexdigest()


def _setup_model(model: nn.Module, arm: ArmConfig, device: torch.device) -> bool:
    """fp32 parameters on `device`, gradient checkpointing as the arm says; returns whether to
    autocast in bf16."""
    ensure_fp32(model)
    model.to(device)
    bf16 = resolve_flag(arm.bf16, device)
    if resolve_flag(arm.gradient_checkpointing, device):
        enable_gradient_checkpointing(model)
    return bf16


@dataclass(frozen=True)
class Callbacks:
    """What the caller of `train()` plugs in: the held-out evaluation (None: the final model is
    the best), how a model is written (None: `default_save_model`), who gets the log entries."""

    evaluate: Evaluate | None
    save_model: SaveModel | None
    on_log: OnLog | None


def prepare_run(
    model: nn.Module,
    train_blocks: torch.LongTensor,
    arm: ArmConfig,
    out_dir: Path,
    seed: int,
    constrained: bool,
    device: torch.device | str | None,
    callbacks: Callbacks,
) -> TrainingRun:
    """Check the inputs, prepare model and optimizer, and fingerprint the run (see module doc)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else pick_device()
    check_inputs(model, train_blocks, constrained)
    n_seq, seq_len = train_blocks.shape
    train_blocks = train_blocks.cpu()
    bf16 = _setup_model(model, arm, device)
    total_steps = total_steps_for(arm, n_seq)
    param_names, optimizer, scheduler = build_optimizer(model, arm, total_steps)
    fingerprint = make_fingerprint(
        model,
        config={k: v for k, v in arm.model_dump(mode="json").items() if k not in _CADENCE_FIELDS},
        run={
            "seed": seed,
            "constrained": constrained,
            "data_shape": [n_seq, seq_len],
            "data_sha256": _data_digest(train_blocks),
            "total_steps": total_steps,
            "effective_batch_size": arm.effective_batch_size,
        },
    )
    return TrainingRun(
        model=model,
        train_blocks=train_blocks,
        arm=arm,
        out_dir=out_dir,
        seed=seed,
        constrained=constrained,
        bf16=bf16,
        total_steps=total_steps,
        param_names=param_names,
        optimizer=optimizer,
        scheduler=scheduler,
        fingerprint=fingerprint,
        fingerprint_digest=digest_json(fingerprint),
        evaluate=callbacks.evaluate,
        save_model=callbacks.save_model or default_save_model,
        on_log=callbacks.on_log,
    )
