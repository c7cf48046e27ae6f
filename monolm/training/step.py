"""One optimizer step and what it needs: fp32 parameters, gradient checkpointing, AdamW over
decay/no-decay groups (the same rule for both arms; the constrained W decayed towards 0, never
towards softplus(0) = ln 2), token-weighted gradient accumulation and the constraint check.

`training_step` is the loop's own step; `bench/train_step.py` times exactly this function.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from monolm.config import ArmConfig
from monolm.constraint.softplus import NonNegativeSoftplus, constrained_modules, min_constrained_weight
from monolm.core.runtime import autocast, model_device
from monolm.training.schedule import LRSchedule

log = logging.getLogger(__name__)

ADAM_EPS = 1e-8


class TrainingDiverged(FloatingPointError):
    """The loss or gradient norm became non-finite."""


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower()


def _param_groups(model: nn.Module, arm: ArmConfig) -> tuple[list[str], list[dict[str, Any]]]:
    """AdamW parameter groups, one rule for both arms (as GPT-NeoX/Pythia): weight decay on weight
    matrices and embeddings, none on biases and normalization weights. A constrained weight's
    V (`parametrizations.weight.original`) is never decayed by AdamW, since decaying V pulls
    W = softplus(V) towards ln 2 rather than 0; with `constrained_weight_decay='materialized'`
    its group carries `materialized_decay`, and `decay_materialized_` decays W itself after each
    step. Returns (parameter names in optimizer order, groups)."""
    no_decay_ids = {id(p) for module in model.modules() if _is_norm(module) for p in module.parameters(recurse=False)}
    constrained_ids = {id(m.parametrizations.weight.original) for _, m in constrained_modules(model)}
    buckets: dict[str, list[tuple[str, nn.Parameter]]] = {"decay": [], "no_decay": [], "constrained": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in constrained_ids:
            buckets["constrained"].append((name, p))
        elif p.ndim < 2 or id(p) in no_decay_ids or name.endswith("bias"):
            buckets["no_decay"].append((name, p))
        else:
            buckets["decay"].append((name, p))
    materialized = arm.weight_decay if arm.constrained_weight_decay == "materialized" else 0.0
    groups = [
        {"params": [p for _, p in buckets["decay"]], "weight_decay": arm.weight_decay},
        {"params": [p for _, p in buckets["no_decay"]], "weight_decay": 0.0},
        {"params": [p for _, p in buckets["constrained"]], "weight_decay": 0.0, "materialized_decay": materialized},
    ]
    names = [n for key in ("decay", "no_decay", "constrained") for n, _ in buckets[key]]
    return names, [g for g in groups if g["params"]]


@torch.no_grad()
def decay_materialized_(optimizer: torch.optim.Optimizer) -> None:
    """Decoupled weight decay of the materialized constrained weights, W <- (1 - lr * wd) W with
    W = softplus(V), written back as V = softplus^-1(W): the baseline's W and the constrained
    arm's W are pulled towards 0 alike. Uses each group's current learning rate, as AdamW does.
    Computed in float64 (a decay of 1e-7 per step is near fp32's resolution) and stored in V's
    dtype; for V below -30, softplus(V) = exp(V) to within 1e-13, so V + log(1 - lr * wd)."""
    for group in optimizer.param_groups:
        wd = group.get("materialized_decay", 0.0)
        if not wd:
            continue
        factor = 1.0 - group["lr"] * wd
        for v in group["params"]:
            v64 = v.to(torch.float64)
            w = F.softplus(v64) * factor
            exact = w + torch.log(-torch.expm1(-w))
            v.copy_(torch.where(v64 < -30.0, v64 + math.log(factor), exact))


def check_materialized_decay(model: nn.Module, arm: ArmConfig) -> None:
    """`constrained_weight_decay='materialized'` inverts softplus: refuse any other parametrization."""
    if arm.constrained_weight_decay != "materialized":
        return
    for name, module in constrained_modules(model):
        chain = list(module.parametrizations.weight)
        if len(chain) != 1 or not isinstance(chain[0], NonNegativeSoftplus):
            raise ValueError(
                f"training.common.constrained_weight_decay='materialized' needs W = softplus(V) "
                f"(NonNegativeSoftplus); {name}.weight is parametrized by {[type(p).__name__ for p in chain]}"
            )


def ensure_fp32(model: nn.Module) -> None:
    """Upcast a model handed in with low-precision parameters: weights and AdamW state stay fp32."""
    low = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32})
    if low:
        log.warning(
            "model parameters are %s; upcasting to fp32 (pure-bf16 AdamW drops updates "
            "smaller than bf16's spacing; bf16 is used only as autocast compute)",
            low,
        )
        model.float()


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on activation checkpointing, non-reentrant so that it works with `parametrize.cached()`
    and with inputs that do not require grad."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the newer name of the same switch
        model.activation_checkpointing_enable(kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")


def _lm_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=input_ids, use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


def accumulate_gradients(
    model: nn.Module,
    batch: torch.LongTensor,
    micro_batch_size: int,
    *,
    bf16: bool = False,
    cache_parametrizations: bool = False,
) -> torch.Tensor:
    """Forward+backward `batch` [B, T] in micro-batches, adding into `.grad`; returns the summed
    next-token loss (a detached scalar). Each micro-batch's summed loss is divided by the number
    of predicted tokens in the whole batch, so the accumulated gradient is that of the batch mean.
    Every position predicts the next token (packed blocks have no padding). `bf16`: autocast the
    forward in bf16 (the loss is computed in fp32 either way)."""
    device = model_device(model)
    n_targets = batch.shape[0] * (batch.shape[1] - 1)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for start in range(0, batch.shape[0], micro_batch_size):
        ids = batch[start : start + micro_batch_size].to(device, non_blocking=True)
        cache = parametrize.cached() if cache_parametrizations else contextlib.nullcontext()
        with cache:
            if cache_parametrizations:
                # Materialize every W = softplus(V) once, *before* the forward: with activation
                # checkpointing the first access would otherwise fall inside a checkpointed block
                # and its recomputation (served from the cache) would save different tensors.
                for _, module in constrained_modules(model):
                    module.weight  # noqa: B018 - fills parametrize's cache
            with autocast(device, bf16):
                logits = _lm_logits(model, ids)
            # The last position predicts nothing: its label is ignored rather than its logits sliced
            # off, which would copy the whole [batch, seq, vocab] tensor (and its gradient).
            targets = F.pad(ids[:, 1:], (0, 1), value=-100)
            loss_sum = F.cross_entropy(
                logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum", ignore_index=-100
            )
            (loss_sum / n_targets).backward()
        total += loss_sum.detach()
    return total


def training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch: torch.LongTensor,
    arm: ArmConfig,
    *,
    constrained: bool,
    bf16: bool,
) -> tuple[float, float, float | None]:
    """One optimizer step on `batch` (all micro-batches): accumulate, clip, AdamW, schedule, and for
    the constrained arm the check of the materialized weights. Returns (summed loss over predicted
    tokens, pre-clip gradient norm, min constrained weight or None). `bf16`: autocast compute, as
    resolved from the arm's `bf16` setting for the device. The loop and `bench/` share it.
    """
    optimizer.zero_grad(set_to_none=True)
    loss_sum = accumulate_gradients(model, batch, arm.micro_batch_size, bf16=bf16, cache_parametrizations=constrained)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if arm.grad_clip is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, arm.grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    loss_value, norm_value = float(loss_sum), float(grad_norm)
    if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
        raise TrainingDiverged(f"loss sum {loss_value}, grad norm {norm_value} (not finite)")
    optimizer.step()
    if constrained:
        decay_materialized_(optimizer)
    scheduler.step()
    min_w = min_constrained_weight(model) if constrained else None  # after *every* step
    return loss_value, norm_value, min_w


def build_optimizer(
    model: nn.Module, arm: ArmConfig, total_steps: int
) -> tuple[list[str], torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (fp32 state) over decay/no-decay groups plus the LambdaLR schedule; returns
    (param_names in optimizer order, optimizer, scheduler)."""
    check_materialized_decay(model, arm)
    param_names, groups = _param_groups(model, arm)
    optimizer = torch.optim.AdamW(groups, lr=arm.lr, betas=(arm.adam_beta1, arm.adam_beta2), eps=ADAM_EPS)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule.from_arm(arm, total_steps))
    return param_names, optimizer, scheduler
