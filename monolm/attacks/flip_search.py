"""HotFlip's greedy search on one text (`attack_text`; the algorithm is described in
`monolm.attacks.hotflip`): candidate swaps from the embedding gradient or, for the control, at
random; exact scoring of the candidates (`flip_scoring`); the best one kept while it raises the
loss on the still-unflipped text tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from monolm.attacks.flip_scoring import score_flips
from monolm.attacks.scoring import (
    AttackSetup,
    TextBatch,
    embedding_gradient,
    first_order_scores,
    text_target_mask,
)
from monolm.config import HotFlipConfig
from monolm.core.deadline import check_deadline
from monolm.core.runtime import model_device

Method = Literal["gradient", "control"]


def base_targets(n_prefix: int, n_text: int) -> torch.Tensor:
    """Targets of the unattacked `prefix + text`: every text token (minus the first one when there
    is no prefix, since nothing predicts it)."""
    return torch.tensor(text_target_mask(n_prefix, n_text, has_prefix=n_prefix > 0), dtype=torch.bool)


def _random_candidates(
    cur: torch.Tensor, open_pos: torch.Tensor, allowed: torch.Tensor, n: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` uniformly random (position, token) swaps: an open position, and an allowed token other
    than the one already there. Duplicates are dropped (order kept)."""
    allowed_ids = torch.nonzero(allowed).flatten()
    pos = open_pos[torch.randint(len(open_pos), (n,), generator=gen)]
    current = cur[pos]
    in_allowed = allowed[current]
    count = len(allowed_ids) - in_allowed.long()
    r = torch.floor(torch.rand(n, generator=gen, dtype=torch.float64) * count).long()
    rank = torch.searchsorted(allowed_ids, current)
    r = r + (in_allowed & (r >= rank)).long()  # skip the current token
    tok = allowed_ids[r]
    seen: set[tuple[int, int]] = set()
    keep = []
    for i, pair in enumerate(zip(pos.tolist(), tok.tolist(), strict=True)):
        if pair not in seen:
            seen.add(pair)
            keep.append(i)
    keep_t = torch.as_tensor(keep, dtype=torch.long)
    return pos[keep_t], tok[keep_t]


def _gradient_candidates(
    model: nn.Module,
    cur: torch.Tensor,
    targets: torch.Tensor,
    open_pos: torch.Tensor,
    allowed: torch.Tensor,
    n: int,
    *,
    bf16: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `n` swaps with the highest first-order score `g_i · (E_v - E_{x_i})`."""
    device = model_device(model)
    E = model.get_input_embeddings().weight.detach()
    grad, _ = embedding_gradient(model, cur.view(1, -1).to(device), None, targets.view(1, -1).to(device), bf16=bf16)
    scores = first_order_scores(grad[0, open_pos.to(device)], E, allowed, current=cur[open_pos].to(device))
    V = scores.shape[1]
    flat = scores.flatten()
    k = min(n, int(torch.isfinite(flat).sum()))
    top = torch.topk(flat, k).indices.cpu()
    return open_pos[top // V], top % V


def _flip_search(
    setup: AttackSetup,
    orig: torch.Tensor,
    base: torch.Tensor,
    cfg: HotFlipConfig,
    *,
    allowed: torch.Tensor,
    method: Method,
    gen: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]], str]:
    """Up to `cfg.max_flips` greedy flips of the text tokens of `orig` (`prefix + text`, targets
    `base`); returns the attacked ids, the flipped positions, the trajectory and why it stopped."""
    model, n_prefix, bf16 = setup.model, len(setup.prefix), setup.bf16
    positions = torch.arange(n_prefix, len(orig))
    cur = orig.clone()
    flipped = torch.zeros_like(base)
    trajectory: list[dict[str, Any]] = []
    for _ in range(cfg.max_flips):
        check_deadline("between HotFlip flips")
        targets = base & ~flipped
        # a flip must leave at least one scored token
        open_pos = positions[~flipped[positions] & ((targets.sum() - targets[positions].long()) >= 1)]
        if len(open_pos) == 0:
            return cur, flipped, trajectory, "no_positions"
        if method == "control":
            cand_pos, cand_tok = _random_candidates(cur, open_pos, allowed, cfg.top_b, gen)
        else:
            cand_pos, cand_tok = _gradient_candidates(model, cur, targets, open_pos, allowed, cfg.top_b, bf16=bf16)
        if len(cand_pos) == 0:
            return cur, flipped, trajectory, "no_candidates"
        before, after = score_flips(model, cur, targets, cand_pos, cand_tok, sizer=setup.sizer, bf16=bf16)
        gains = after - before
        best = int(torch.argmax(gains))
        if not bool(gains[best] > 0):
            return cur, flipped, trajectory, "no_gain"
        pos, new = int(cand_pos[best]), int(cand_tok[best])
        trajectory.append(
            {
                "position": pos - n_prefix,
                "old_id": int(cur[pos]),
                "new_id": new,
                "loss_before": float(before[best]),
                "loss_after": float(after[best]),
                "n_candidates": len(cand_pos),
            }
        )
        cur[pos] = new
        flipped[pos] = True
    return cur, flipped, trajectory, "max_flips"


def attack_text(
    setup: AttackSetup,
    text_ids: Sequence[int],
    cfg: HotFlipConfig,
    *,
    allowed: torch.Tensor,
    method: Method = "gradient",
    gen: torch.Generator | None = None,
    success_threshold: float = 0.15,
) -> dict[str, Any]:
    """Greedy flips on one text (after `setup.prefix`); returns the example record (see SCHEMA.md)."""
    if method == "control" and gen is None:
        raise ValueError("the control draws random candidates and needs an explicit generator")
    n = len(text_ids)
    orig = torch.as_tensor([*setup.prefix, *text_ids], dtype=torch.long)
    base = base_targets(len(setup.prefix), n)
    cur, flipped, trajectory, stopped = _flip_search(setup, orig, base, cfg, allowed=allowed, method=method, gen=gen)
    final = base & ~flipped
    pair = torch.stack([orig, cur])
    losses = setup.losses(TextBatch(pair, torch.ones_like(pair), final.view(1, -1).repeat(2, 1)))
    clean, attacked = float(losses[0]), float(losses[1])
    return {
        "n_tokens": n,
        "text_ids": list(text_ids),
        "clean_loss": clean,
        "attacked_loss": attacked,
        "abs_increase": attacked - clean,
        "rel_increase": (attacked - clean) / clean,
        "success": (attacked - clean) / clean > success_threshold,
        "flips_used": len(trajectory),
        "positions": [t["position"] for t in trajectory],
        "original_ids": [t["old_id"] for t in trajectory],
        "new_ids": [t["new_id"] for t in trajectory],
        "n_targets": int(final.sum()),
        "stopped": stopped,
        "trajectory": trajectory,
    }
