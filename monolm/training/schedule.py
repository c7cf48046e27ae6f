"""Step budget, learning-rate schedule and data order: everything that decides *which* step comes
next, as plain values a checkpoint can record and a resume can rebuild exactly."""

from __future__ import annotations

import math

import torch

from monolm.config import ArmConfig
from monolm.core.runtime import derive_seed


def total_steps_for(arm: ArmConfig, n_sequences: int) -> int:
    """min(max_steps, ceil(epochs * N / effective_batch)): the optimizer-step budget."""
    steps = math.ceil(arm.epochs * n_sequences / arm.effective_batch_size)
    if arm.max_steps is not None:
        steps = min(steps, arm.max_steps)
    return max(1, steps)


class LRSchedule:
    """Multiplier of the base lr for 0-based step `s`: linear warmup to 1, then cosine/linear decay
    to `min_lr_ratio` or constant. A plain object (not a closure) so `LambdaLR.state_dict()`
    records its fields in the checkpoint."""

    def __init__(self, total_steps: int, warmup_steps: int, kind: str, min_lr_ratio: float):
        if kind not in ("cosine", "linear", "constant"):
            raise ValueError(f"unknown schedule {kind!r}")
        self.total_steps = int(total_steps)
        self.warmup_steps = int(min(warmup_steps, total_steps))
        self.kind = kind
        self.min_lr_ratio = float(min_lr_ratio)

    @classmethod
    def from_arm(cls, arm: ArmConfig, total_steps: int) -> LRSchedule:
        return cls(total_steps, math.ceil(arm.warmup_ratio * total_steps), arm.schedule, arm.min_lr_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps  # never 0: the first step is not wasted
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if self.kind == "cosine" else 1.0 - progress
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape


class DataOrder:
    """Yields sequence indices: one permutation per epoch from an explicit, seeded generator.

    A batch that runs past the end of an epoch continues with the next epoch's permutation, so
    every optimizer step has exactly `effective_batch` sequences.
    """

    def __init__(self, n: int, seed: int, epoch: int = 0, index: int = 0):
        if n < 1:
            raise ValueError("no training sequences")
        self.n, self.seed = n, seed
        self.epoch, self.index = epoch, index
        self._make_perm()

    def _make_perm(self) -> None:
        g = torch.Generator(device="cpu")
        g.manual_seed(derive_seed(self.seed, "data", self.epoch))
        self.perm = torch.randperm(self.n, generator=g)
        self.generator_state = g.get_state()

    def take(self, k: int) -> torch.Tensor:
        parts = []
        while k > 0:
            if self.index >= self.n:
                self.epoch, self.index = self.epoch + 1, 0
                self._make_perm()
            chunk = self.perm[self.index : self.index + k]
            parts.append(chunk)
            self.index += len(chunk)
            k -= len(chunk)
        return torch.cat(parts)

    @property
    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    @property
    def epochs_done(self) -> float:
        return (self.epoch * self.n + self.index) / self.n
