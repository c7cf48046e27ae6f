"""How many constrained weights are effectively frozen: dW/dV = sigmoid(V) below a bound.

Why: W = softplus(V) has gradient dW/dV = sigmoid(V), which vanishes as V → −∞. The `clamp` init
sends every negative pretrained weight to W = eps ≈ 1e-6, i.e. V ≈ log(eps) ≈ −13.8 and
dW/dV ≈ 1e-6: those weights (about half of the constrained matrix) receive a millionth of the
gradient of the others and stay where they start. The clamp arm is then, in effect, "negative
weights pruned and frozen", and a reader has to see that to interpret what an init does. Stage 1
reports the share at the start; the constrained arm's training at its start and end.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

FROZEN_BOUND = 1e-3  # dW/dV below this: the weight moves < 1/1000 of an unconstrained weight per step


def frozen_share(model: nn.Module, bound: float = FROZEN_BOUND) -> dict[str, float | int]:
    """{"frozen_share", "frozen", "constrained", "bound"}: the share of constrained weights whose
    dW/dV = sigmoid(V) is below `bound` (0 constrained weights gives share 0)."""
    frozen = total = 0
    for module in model.modules():
        if not parametrize.is_parametrized(module, "weight"):
            continue
        v = module.parametrizations.weight.original.detach()
        with torch.no_grad():
            frozen += int((torch.sigmoid(v.float()) < bound).sum())
        total += v.numel()
    return {"frozen_share": frozen / total if total else 0.0, "frozen": frozen, "constrained": total, "bound": bound}
