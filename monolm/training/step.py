"""One optimizer step and what it needs: fp32 parameters, gradient checkpointing, AdamW over
decay/no-decay groups, token-weighted gradient accumulation and the constraint check.

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
from monolm.constraints import constrained_modules, min_constrained_weight
from monolm.runtime import autocast, model_device
from monolm.training.schedule import LRSchedule

log = logging.getLogger(__name__)

ADAM_EPS = 1e-8


class TrainingDiverged(FloatingPointError):
    """The loss or gradient norm became non-finite."""


def _param_groups(model: nn.Module, weight_decay: float) -> tuple[list[str], list[dict[str, Any]]]:
    """Decay matrices (incl. parametrization originals V and embeddings), not biases/norms —
    the usual rule, identical for both arms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append((name, p))
    names = [n for n, _ in decay] + [n for n, _ in no_decay]
    groups = [
        {"params": [p for _, p in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "weight_decay": 0.0},
    ]
    return names, [g for g in groups if g["params"]]


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
    scheduler.step()
    min_w = min_constrained_weight(model) if constrained else None  # after *every* step
    return loss_value, norm_value, min_w


def build_optimizer(
    model: nn.Module, arm: ArmConfig, total_steps: int
) -> tuple[list[str], torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (fp32 state) over decay/no-decay groups plus the LambdaLR schedule; returns
    (param_names in optimizer order, optimizer, scheduler)."""
    param_names, groups = _param_groups(model, arm.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=arm.lr, betas=(arm.adam_beta1, arm.adam_beta2), eps=ADAM_EPS)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule.from_arm(arm, total_steps))
    return param_names, optimizer, scheduler
