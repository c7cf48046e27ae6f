"""The damage-matched arm's science: Gaussian noise on the baseline's constrained-role matrices,
its scale bisected until the validation loss matches the constrained arm's.

Why: a constrained model is always worse at its job, and a worse model is often less sensitive to
an attack only because it models text less sharply. The damage-matched arm is the baseline made
*equally bad* (same validation loss) without any constraint, by perturbing exactly the matrices the
variant constrains: W' = W + s * rms(W) * Z, Z ~ N(0, 1) drawn once per matrix from the seed. If
the constrained arm is more robust than this arm at equal clean loss, the constraint did more than
damage the model. Nothing is trained.

The loss is, in expectation, increasing in s; with Z fixed, each validation loss is a
deterministic function of s, so the bisection is reproducible for a seed. The bracket is found by
doubling `initial_scale` until the loss passes the target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from monolm.constraint.softplus import constrained_targets, resolve_targets


def damage_matrices(model: nn.Module, variant: str) -> list[str]:
    """The qualified names of the Linears `variant` constrains in the (unconstrained) `model`."""
    return [t.name for t in resolve_targets(model, variant)]


def constrained_matrices(model: nn.Module) -> list[str]:
    """The qualified names of the Linears a constrained model constrains."""
    return [t.name for t in constrained_targets(model)]


class Perturbation:
    """W0 + scale * rms(W0) * Z on the named Linears of `model`, in place, for any scale.

    Z is drawn once per matrix, in the order of `names`, from a CPU generator seeded by `seed`
    (the same noise on any device); `restore()` puts the original weights back."""

    def __init__(self, model: nn.Module, names: list[str], seed: int) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if not isinstance(modules.get(n), nn.Linear)]
        if missing:
            raise ValueError(f"damage: no Linear called {', '.join(missing)} in {type(model).__name__}")
        generator = torch.Generator().manual_seed(seed)
        self.weights: dict[str, torch.Tensor] = {n: modules[n].weight for n in names}
        self.original = {n: w.detach().clone() for n, w in self.weights.items()}
        self.noise = {
            n: torch.randn(w.shape, generator=generator, dtype=torch.float32).to(w.device, w.dtype)
            for n, w in self.weights.items()
        }
        self.rms = {n: float(w.detach().float().pow(2).mean().sqrt()) for n, w in self.weights.items()}

    @torch.no_grad()
    def apply(self, scale: float) -> None:
        for name, weight in self.weights.items():
            weight.copy_(self.original[name] + (scale * self.rms[name]) * self.noise[name])

    def restore(self) -> None:
        self.apply(0.0)


@dataclass
class Bisection:
    """Where the search ended: the scale whose loss was closest to the target, whether that is
    within the tolerance, and every (scale, loss) it evaluated, in order."""

    scale: float
    loss: float
    target: float
    tolerance: float
    steps: int
    within_tolerance: bool
    trace: list[tuple[float, float]] = field(default_factory=list)
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "trace": [list(p) for p in self.trace]}


def bisect_scale(
    loss_at: Callable[[float], float],
    target: float,
    *,
    tolerance: float,
    max_steps: int,
    initial_scale: float = 0.5,
) -> Bisection:
    """The noise scale whose `loss_at` is within `tolerance` of `target`, in at most `max_steps`
    evaluations (scale 0, the doublings that bracket the target, then halvings). A baseline already
    at or above the target needs no noise (scale 0, with a note)."""
    trace: list[tuple[float, float]] = []

    def probe(scale: float) -> float:
        loss = float(loss_at(scale))
        trace.append((scale, loss))
        return loss

    def done(note: str | None = None) -> Bisection:
        scale, loss = min(trace, key=lambda p: (abs(p[1] - target), p[0]))
        ok = abs(loss - target) <= tolerance
        if not ok and note is None:
            note = f"no scale within {tolerance} nats of the target after {len(trace)} evaluations"
        return Bisection(scale, loss, target, tolerance, len(trace), ok, trace, note)

    lo = 0.0
    if probe(lo) >= target - tolerance:
        return done("the baseline's validation loss is already at or above the target: no noise added")
    hi = initial_scale
    while len(trace) < max_steps:
        loss = probe(hi)
        if abs(loss - target) <= tolerance or loss > target:
            break
        lo, hi = hi, hi * 2
    while len(trace) < max_steps and abs(trace[-1][1] - target) > tolerance:
        mid = (lo + hi) / 2
        if probe(mid) < target:
            lo = mid
        else:
            hi = mid
    return done()


def match_damage(
    model: nn.Module,
    names: list[str],
    val_loss: Callable[[nn.Module], float],
    target: float,
    *,
    seed: int,
    tolerance: float,
    max_steps: int,
    initial_scale: float = 0.5,
) -> Bisection:
    """Perturb `names` of `model` in place to the bisected scale (left applied) so that
    `val_loss(model)` matches `target`; returns the search."""
    perturbation = Perturbation(model, names, seed)

    def loss_at(scale: float) -> float:
        perturbation.apply(scale)
        return val_loss(model)

    result = bisect_scale(loss_at, target, tolerance=tolerance, max_steps=max_steps, initial_scale=initial_scale)
    perturbation.apply(result.scale)
    return result
