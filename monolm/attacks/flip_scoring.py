"""Exact loss of many single-token flips of one text, the expensive step of HotFlip.

Every candidate differs from the current text in one position, so everything before its flip is
the current text's own computation: candidates are sorted by flip position and scored in batches
that reuse the current text's keys/values up to the batch's earliest flip (`score_flips`), with a
batch split chosen by `plan_chunks`. Both the text before and after a flip are scored on the same
targets, the current ones minus the flipped position (`flip_target_masks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from monolm.attacks.scoring import (
    BatchSizer,
    cache_argument,
    masked_mean,
    output_cache,
)
from monolm.core.cross_entropy import cross_entropy_fp32, max_tokens_per_forward
from monolm.core.runtime import autocast, is_oom, model_device


def flip_target_masks(targets: torch.Tensor, cand_pos: torch.Tensor) -> torch.Tensor:
    """[B, T]: the current targets minus each candidate's own position. A flipped token is never
    scored, and the text before the flip is compared on exactly the same targets."""
    masks = targets.view(1, -1).repeat(len(cand_pos), 1)
    masks[torch.arange(len(cand_pos)), cand_pos] = False
    return masks


def plan_chunks(sorted_pos: Sequence[int], seq_len: int, max_rows: int, overhead: int) -> list[int]:
    """Split candidates sorted by flip position into batches (returns the end index of each).

    A batch starting at sorted position s costs `rows * (seq_len - s)` token-rows (it runs
    positions s..T-1 for each row) plus `overhead` per forward pass; dynamic programming finds the
    cheapest split with at most `max_rows` rows per batch. Large batches waste the prefix that the
    later candidates could have skipped; tiny batches pay per-pass overhead."""
    B = len(sorted_pos)
    best = [0.0] + [float("inf")] * B
    cut = [0] * (B + 1)
    for b in range(1, B + 1):
        for a in range(max(0, b - max_rows), b):
            cost = best[a] + (b - a) * (seq_len - sorted_pos[a]) + overhead
            if cost < best[b]:
                best[b], cut[b] = cost, a
    ends = []
    b = B
    while b > 0:
        ends.append(b)
        b = cut[b]
    return ends[::-1]


def _overhead_rows(device: torch.device) -> int:
    """Per-forward-pass overhead in token-rows: small on CPU (compute-bound), large on a GPU
    (launch latency and under-filled kernels)."""
    return 4096 if device.type == "cuda" else 48


def _current_text_pass(
    model: nn.Module, cur: torch.Tensor, *, share_prefix: bool, bf16: bool
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]] | None]:
    """Per-token losses [T] of the current text (0 at position 0, which nothing predicts) and,
    with `share_prefix`, its keys and values per layer (None without them)."""
    device = model_device(model)
    with torch.no_grad(), autocast(device, bf16):
        out = model(input_ids=cur.view(1, -1).to(device), use_cache=share_prefix)
        tok0 = torch.zeros(len(cur), dtype=torch.float32)
        tok0[1:] = cross_entropy_fp32(out.logits[:, :-1], cur[1:].view(1, -1).to(device))[0].cpu()
        cache = output_cache(out) if share_prefix else None
    if cache is None or not hasattr(cache, "layers"):
        return tok0, None
    return tok0, [(layer.keys, layer.values) for layer in cache.layers]


def _flipped_losses(
    model: nn.Module,
    cur: torch.Tensor,
    start: int,
    pos: torch.Tensor,
    tok: torch.Tensor,
    *,
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None,
    cache_arg: str | None,
    bf16: bool,
) -> torch.Tensor:
    """Per-token CE [n, T - start - 1] of positions start+1 .. T-1 of `cur` with each flip
    (pos[i] -> tok[i]) applied; positions < `start` come from the cached keys/values `kv`."""
    device = model_device(model)
    n = len(pos)
    rows = cur[start:].view(1, -1).repeat(n, 1)
    rows[torch.arange(n), pos - start] = tok
    with torch.no_grad(), autocast(device, bf16):
        kwargs: dict[str, Any] = {"use_cache": start > 0}
        if start > 0:
            kwargs[cache_arg] = DynamicCache(
                [(k[:, :, :start].expand(n, -1, -1, -1), v[:, :, :start].expand(n, -1, -1, -1)) for k, v in kv]
            )
        logits = model(input_ids=rows.to(device), **kwargs).logits[:, :-1]
        return cross_entropy_fp32(logits, rows[:, 1:].to(device)).cpu()


def score_flips(
    model: nn.Module,
    cur: torch.Tensor,
    targets: torch.Tensor,
    cand_pos: torch.Tensor,
    cand_tok: torch.Tensor,
    *,
    sizer: BatchSizer,
    share_prefix: bool = True,
    bf16: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact loss of the current text and of each single-flip candidate, both on the targets
    without the candidate's position: returns `(before [B], after [B])`.

    One forward pass of the current text gives its per-token losses and its key/value cache.
    Candidates are sorted by position and scored in batches; a batch whose earliest flip is at
    position s reuses the cached keys/values of positions < s and runs only positions s..T-1
    (`share_prefix`), because everything before the first changed token is identical to the
    current text. The result equals full forward passes up to float rounding (tested). The
    saving depends on where the candidates are: about half the work when they are spread over
    the text, little when the gradient favours the first tokens (which change everything after).
    """
    device = model_device(model)
    T, B = len(cur), len(cand_pos)
    cache_arg = cache_argument(type(model))
    tok0, kv = _current_text_pass(model, cur, share_prefix=share_prefix and cache_arg is not None, bf16=bf16)
    tok = tok0.view(1, -1).repeat(B, 1)
    order = torch.argsort(cand_pos, stable=True)
    sorted_pos = cand_pos[order].tolist()
    done = 0
    while done < B:
        rows_cap = min(sizer.size, max(1, max_tokens_per_forward(device) // T))
        if kv is None:
            end = min(B, done + rows_cap)
        else:
            end = plan_chunks(sorted_pos[done:], T, rows_cap, _overhead_rows(device))[0] + done
        idx = order[done:end]
        s = sorted_pos[done] if kv is not None else 0  # 0: no shared prefix, full rows
        try:
            ce = _flipped_losses(model, cur, s, cand_pos[idx], cand_tok[idx], kv=kv, cache_arg=cache_arg, bf16=bf16)
        except RuntimeError as exc:
            if not is_oom(exc):
                raise
            sizer.shrink(exc)
            continue
        tok[idx, s + 1 :] = ce  # positions <= s are predicted from the unchanged prefix
        done = end
    masks = flip_target_masks(targets, cand_pos)
    before = masked_mean(tok0.view(1, -1).expand(B, -1), masks)
    after = masked_mean(tok, masks)
    return before, after
