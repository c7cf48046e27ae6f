"""Machinery shared by the attacks: the objective, gradients, and exact batched re-scoring of
candidates (the tokens they may use and the sequences they build: `monolm.attacks.sequences`).

Why these choices (each one changes what the attack numbers mean):

* **The objective is the loss on the original text tokens only.** Every sequence carries a
  `target_mask`; position `t` is a target when the token *at* `t` is an original, unmodified text
  token (it is predicted from position `t - 1`). Trigger tokens, a one-token context prefix and
  flipped positions are never targets, otherwise an attack could "win" by making its own tokens
  unlikely. The masks are plain tensors so tests can inspect every mask that was ever scored.
* **Candidate tokens** and the sequences themselves (padded batches with their masks) are in
  `monolm.attacks.sequences`.
* **Gradients** use the embedding trick: the gradient of the loss w.r.t. the input embeddings,
  dotted with the embedding matrix, is the first-order estimate of the loss change when position
  `i` is swapped to token `v`: `g_i · (E_v - E_{x_i})` (higher is better for a loss to maximise).
* **Exact re-scoring is batched** (many candidate sequences per forward pass, sorted by length so
  little padding is computed) with a batch size that halves on out-of-memory and stays halved.
  Right padding cannot change a causal model's outputs at real positions, so the batched losses
  equal one-forward-per-candidate losses up to float rounding (tested);
  `score_candidates_loop` is that per-candidate reference and is used only by tests and the bench.
* bf16 autocast only where the caller's resolved `bf16` flag says so (`runtime.bf16_enabled`:
  on CUDA only for the attacks); losses are always reduced in fp32.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from monolm.attacks.sequences import (  # noqa: F401  (re-exported: the attacks' common names)
    TextBatch,
    allowed_token_mask,
    check_texts,
    checked_allowed_mask,
    context_prefix,
    pad_batch,
    text_target_mask,
    truncate,
)
from monolm.core.cross_entropy import cross_entropy_fp32, max_tokens_per_forward
from monolm.core.runtime import Bf16, autocast, bf16_enabled, eval_mode, is_oom, model_device

log = logging.getLogger("monolm.attacks")


# --------------------------------------------------------------------------- the objective
@functools.cache
def _accepts_logits_to_keep(cls: type) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


@functools.cache
def cache_argument(cls: type) -> str | None:
    """The forward's keyword for a key/value cache: `cache` where the forward takes it (the newer
    name, which deprecates `past_key_values`), else `past_key_values` (a forward that does not
    know `cache=` would silently ignore it, giving wrong losses). None when it takes neither."""
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def output_cache(out: Any) -> Any:
    """The key/value cache of a forward's output, under either name (see `cache_argument`)."""
    return out.get("cache") if "cache" in out else out.get("past_key_values")


def _forward_logits(
    model: nn.Module,
    *,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None,
    keep_from: int,
) -> torch.Tensor:
    """Logits at positions `keep_from .. T-1` (earlier positions predict no target).

    With `logits_to_keep`, the LM head (50304 x 2048 for Pythia-1.4B) runs only where a loss is
    needed. A mask of all ones is passed as None so the causal fast path is used.
    """
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    T = (input_ids if input_ids is not None else inputs_embeds).shape[1]
    kwargs: dict[str, Any] = {"attention_mask": attention_mask, "use_cache": False}
    if _accepts_logits_to_keep(type(model)):
        kwargs["logits_to_keep"] = T - keep_from
    if input_ids is not None:
        out = model(input_ids=input_ids, **kwargs)
    else:
        out = model(inputs_embeds=inputs_embeds, **kwargs)
    logits = out.logits
    return logits[:, logits.shape[1] - (T - keep_from) :]


def _token_losses_from(
    model: nn.Module, target_mask: torch.Tensor, labels: torch.Tensor, **inputs: Any
) -> torch.Tensor:
    """Per-token cross-entropy [N, T] in fp32; zero where `target_mask` is False."""
    if target_mask[:, 0].any():
        raise ValueError("position 0 cannot be a target: no position predicts it")
    N, T = labels.shape
    out = torch.zeros((N, T), dtype=torch.float32, device=labels.device)
    if not target_mask.any():
        return out
    first = int(target_mask.any(0).nonzero()[0])  # earliest target column
    logits = _forward_logits(model, keep_from=first - 1, **inputs)[:, :-1]  # predict first..T-1
    ce = cross_entropy_fp32(logits, labels[:, first:])
    out[:, first:] = ce * target_mask[:, first:]
    return out


def masked_mean(token_losses: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean over target positions (NaN for a row without targets)."""
    mask = target_mask.to(token_losses.dtype)
    return (token_losses * mask).sum(1) / mask.sum(1)


def token_losses(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    target_mask: torch.Tensor,
    *,
    bf16: bool = False,
) -> torch.Tensor:
    """Per-token CE [N, T] of one batch, no gradient (under bf16 autocast when `bf16`).

    `no_grad`, not `inference_mode`: inside `attack_mode` the constrained weights are cached on
    first use, and an inference tensor could not be reused by the next gradient computation."""
    with torch.no_grad(), autocast(input_ids.device, bf16):
        return _token_losses_from(model, target_mask, input_ids, input_ids=input_ids, attention_mask=attention_mask)


def embedding_gradient(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    target_mask: torch.Tensor,
    *,
    bf16: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of each sequence's objective w.r.t. its input embeddings.

    Returns `(grad [N, T, H] fp32, losses [N])`. The sum of the per-sequence losses is
    differentiated, so row n holds the gradient of row n's own loss (rows do not interact). Only
    the embeddings require a gradient: no parameter gradients are built or accumulated.
    """
    embed = model.get_input_embeddings()
    with torch.no_grad():
        base = embed(input_ids).detach()
    embeds = base.clone().requires_grad_(True)
    with _params_frozen(model), torch.enable_grad(), autocast(input_ids.device, bf16):
        tok = _token_losses_from(model, target_mask, input_ids, inputs_embeds=embeds, attention_mask=attention_mask)
        losses = masked_mean(tok, target_mask)
        (grad,) = torch.autograd.grad(losses.sum(), embeds)
    return grad.float(), losses.detach()


def first_order_scores(
    grad: torch.Tensor, embedding_matrix: torch.Tensor, allowed: torch.Tensor, current: torch.Tensor | None = None
) -> torch.Tensor:
    """First-order estimate of the loss change of swapping each position to each token.

    `grad` [P, H] (one row per position), `embedding_matrix` [V, H]. Returns [P, V]:
    `grad_p · E_v`, minus `grad_p · E_{current_p}` when `current` [P] is given (needed to compare
    swaps at different positions). Disallowed tokens and the current token score -inf.
    """
    E = embedding_matrix.detach().float()
    scores = grad.float() @ E.T
    if current is not None:
        scores = scores - (grad.float() * E[current]).sum(-1, keepdim=True)
        scores.scatter_(1, current.view(-1, 1), float("-inf"))
    scores[:, ~allowed.to(scores.device)] = float("-inf")
    return scores


# --------------------------------------------------------------------------- batched scoring


@dataclass
class BatchSizer:
    """The current candidate batch size; halves on out-of-memory and stays halved, so one OOM
    costs one retry per run instead of one per call."""

    size: int

    def shrink(self, exc: BaseException) -> None:
        if self.size <= 1:
            raise exc
        self.size = max(1, self.size // 2)
        log.warning("out of memory while scoring candidates; batch size halved to %d", self.size)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def score_candidates_batched(
    model: nn.Module,
    batch: TextBatch,
    *,
    batch_size: int | BatchSizer = 128,
    per_token: bool = False,
    bf16: bool = False,
) -> torch.Tensor:
    """Exact losses of many candidate sequences, many per forward pass.

    Rows are sorted by length (longest first, so an OOM shows up in the first batch) and every
    batch is cut to its longest row, so almost no padding is computed. On CPU a batch also holds
    at most `CPU_TOKENS_PER_FORWARD` tokens (`max_tokens_per_forward`). Returns the per-row mean
    loss over target positions [N] (fp32, on CPU), or with `per_token` the per-token losses [N, T].
    """
    sizer = batch_size if isinstance(batch_size, BatchSizer) else BatchSizer(int(batch_size))
    device = model_device(model)
    N, T = batch.input_ids.shape
    lengths = batch.attention_mask.sum(1)
    order = torch.argsort(-lengths, stable=True)
    out = torch.zeros((N, T), dtype=torch.float32)
    start = 0
    cap = max_tokens_per_forward(device)
    while start < N:
        width = int(lengths[order[start]])  # longest remaining row
        idx = order[start : start + min(sizer.size, max(1, cap // width))]
        chunk = batch.rows(idx, width).to(device)
        try:
            tok = token_losses(model, chunk.input_ids, chunk.attention_mask, chunk.target_mask, bf16=bf16)
        except RuntimeError as exc:
            if not is_oom(exc):
                raise
            sizer.shrink(exc)
            continue
        out[idx, :width] = tok.cpu()
        start += len(idx)
    return out if per_token else masked_mean(out, batch.target_mask.cpu())


def score_candidates_loop(
    model: nn.Module, batch: TextBatch, *, per_token: bool = False, bf16: bool = False
) -> torch.Tensor:
    """Reference: one forward pass per candidate sequence, unpadded (a per-candidate loop like the
    original study's). Only the benchmark and the equality test use it."""
    device = model_device(model)
    N, T = batch.input_ids.shape
    out = torch.zeros((N, T), dtype=torch.float32)
    for row in range(N):
        width = int(batch.attention_mask[row].sum())
        one = batch.rows(slice(row, row + 1), width).to(device)
        out[row, :width] = token_losses(model, one.input_ids, None, one.target_mask, bf16=bf16)[0].cpu()
    return out if per_token else masked_mean(out, batch.target_mask.cpu())


@dataclass(frozen=True)
class AttackSetup:
    """What every step of one attack run shares: the model, the context prefix every sequence
    starts with, one batch sizer for the whole run and the resolved bf16 autocast flag."""

    model: nn.Module
    prefix: list[int]
    sizer: BatchSizer
    bf16: bool = False

    @classmethod
    def of(cls, model: nn.Module, prefix: Sequence[int], batch_size: int | BatchSizer, bf16: Bf16) -> AttackSetup:
        """The setup of a run on `model` with the `bf16` setting (autocast on CUDA only)."""
        sizer = batch_size if isinstance(batch_size, BatchSizer) else BatchSizer(batch_size)
        return cls(model, list(prefix), sizer, bf16_enabled(bf16, model_device(model), cuda_only=True))

    def losses(self, batch: TextBatch, *, per_token: bool = False) -> torch.Tensor:
        """`score_candidates_batched` of `batch` with this run's model, sizer and bf16 flag."""
        return score_candidates_batched(self.model, batch, batch_size=self.sizer, per_token=per_token, bf16=self.bf16)


# --------------------------------------------------------------------------- model state
@contextlib.contextmanager
def _params_frozen(model: nn.Module) -> Iterator[None]:
    """No parameter gradients while differentiating w.r.t. the input embeddings."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def attack_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, frozen parameters, and constrained weights materialised once for the whole
    attack (`parametrize.cached`: softplus(V) is not recomputed on every forward). Restores the
    model's training flag afterwards."""
    with eval_mode(model), _params_frozen(model), parametrize.cached():
        yield
