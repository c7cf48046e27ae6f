"""The share of constrained weights that are effectively frozen (dW/dV = sigmoid(V) below a bound),
and the constraint docstring that no longer claims a softplus gradient never vanishes (issue 23)."""

from __future__ import annotations

import torch

from monolm.constraint import softplus
from monolm.constraint.frozen import FROZEN_BOUND, frozen_share
from monolm.constraint.softplus import apply_constraint, resolve_targets
from tests.helpers import tiny_neox


def _negative_share(model, variant):
    weights = [t.module.weight.detach() for t in resolve_targets(model, variant)]
    return sum(int((w < 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def test_clamp_freezes_the_negative_weights_and_abs_freezes_almost_none():
    clamp, absolute = tiny_neox(seed=0), tiny_neox(seed=0)
    negative = _negative_share(clamp, "mlp_both")
    apply_constraint(clamp, "mlp_both", "clamp")
    apply_constraint(absolute, "mlp_both", "abs")
    frozen = frozen_share(clamp)
    assert frozen["bound"] == FROZEN_BOUND and frozen["constrained"] > 0
    # every clamped (negative) weight, plus the few positive ones already below the bound
    assert negative <= frozen["frozen_share"] < negative + 0.05 and 0.3 < negative < 0.7
    assert frozen_share(absolute)["frozen_share"] < 0.05


def test_a_frozen_weight_gets_a_millionth_of_the_gradient():
    model = tiny_neox(seed=0)
    apply_constraint(model, "mlp_in", "clamp")
    layer = resolve_targets(model, "mlp_in")[0].module
    v = layer.parametrizations.weight.original
    layer.weight.sum().backward()
    clamped = layer.weight.detach() <= 1e-6 * 1.01  # the negative weights clamp sent to eps
    assert clamped.any() and float(v.grad[clamped].abs().max()) < 2e-6
    assert float(v.grad[torch.sigmoid(v.detach()) < FROZEN_BOUND].abs().max()) < FROZEN_BOUND


def test_the_docstring_no_longer_says_the_gradient_never_vanishes():
    doc = " ".join(softplus.__doc__.split())
    assert "never vanish" not in doc and "pruned and frozen" in doc
