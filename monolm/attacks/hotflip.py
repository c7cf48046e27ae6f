"""HotFlip (Ebrahimi et al. 2018), stage 6, with a query-only control.

Per text (prefixed with the one-token context of `common.context_prefix`), up to `max_flips`
greedy flips:

1. the gradient of the loss on the still-unflipped text tokens w.r.t. the input embeddings gives
   the first-order score `g_i · (E_v - E_{x_i})` of every swap (position i, token v) at every
   not-yet-flipped text position and every allowed token;
2. the top `top_b` swaps are re-scored exactly, all in one batched forward pass;
3. the best one is applied if it raises the loss. A flip at position i removes i from the scored
   targets (a flipped token is never scored), so "raises" compares the loss before and after on
   the *same* target set, the unflipped tokens without i, both from the same forward pass.
   Otherwise the search stops.

The **control** (`method="control"`) runs the same greedy search with `top_b` random (position,
token) candidates drawn from a generator seeded with (seed, "hotflip_control", example), and no
gradients. If the gradient attack does no better than random search on one model but much better
on another, the difference lies in the gradients (masking), not in robustness.

Each example's reported losses are the clean and attacked loss on its final target set (text
tokens minus flipped positions). Blocks of `block_size` examples are resumable units
(`units/hotflip-<b>.json`, `units/hotflip_control-<b>.json`).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from monolm import stats
from monolm.artifacts import atomic_write_text, atomic_write_json
from monolm.attacks import units
from monolm.attacks.common import (
    BatchSizer,
    cache_argument,
    cross_entropy_fp32,
    is_oom,
    max_rows_for,
    use_bf16,
    allowed_token_mask,
    attack_mode,
    check_texts,
    context_prefix,
    digest_json,
    embedding_gradient,
    first_order_scores,
    masked_mean,
    model_fingerprint,
    output_cache,
    pad_batch,
    score_candidates_batched,
    truncate,
)
from monolm.attacks.effects import effect_summary
from monolm.config import HotFlipConfig
from monolm.runtime import autocast, generator

default_log = logging.getLogger("monolm.attacks")
Method = Literal["gradient", "control"]
KINDS: dict[str, str] = {"gradient": "hotflip", "control": "hotflip_control"}
EXAMPLE_FILES: dict[str, str] = {"gradient": "hotflip_examples.jsonl", "control": "hotflip_control_examples.jsonl"}


def base_targets(n_prefix: int, n_text: int) -> torch.Tensor:
    """Targets of the unattacked `prefix + text`: every text token (minus the first one when there
    is no prefix, since nothing predicts it)."""
    mask = torch.zeros(n_prefix + n_text, dtype=torch.bool)
    mask[n_prefix:] = True
    mask[0] = False
    return mask


def _random_candidates(cur: torch.Tensor, open_pos: torch.Tensor, allowed: torch.Tensor, n: int,
                       gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
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
    for i, pair in enumerate(zip(pos.tolist(), tok.tolist())):
        if pair not in seen:
            seen.add(pair)
            keep.append(i)
    keep_t = torch.as_tensor(keep, dtype=torch.long)
    return pos[keep_t], tok[keep_t]


def _gradient_candidates(model: nn.Module, cur: torch.Tensor, targets: torch.Tensor, open_pos: torch.Tensor,
                         allowed: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `n` swaps with the highest first-order score `g_i · (E_v - E_{x_i})`."""
    device = next(model.parameters()).device
    E = model.get_input_embeddings().weight.detach()
    grad, _ = embedding_gradient(model, cur.view(1, -1).to(device), None, targets.view(1, -1).to(device))
    scores = first_order_scores(grad[0, open_pos.to(device)], E, allowed, current=cur[open_pos].to(device))
    V = scores.shape[1]
    flat = scores.flatten()
    k = min(n, int(torch.isfinite(flat).sum()))
    top = torch.topk(flat, k).indices.cpu()
    return open_pos[top // V], top % V


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


def score_flips(
    model: nn.Module,
    cur: torch.Tensor,
    targets: torch.Tensor,
    cand_pos: torch.Tensor,
    cand_tok: torch.Tensor,
    *,
    sizer: BatchSizer,
    share_prefix: bool = True,
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
    device = next(model.parameters()).device
    T, B = len(cur), len(cand_pos)
    masks = flip_target_masks(targets, cand_pos)
    cache_arg = cache_argument(type(model))
    share_prefix = share_prefix and cache_arg is not None
    with torch.no_grad(), autocast(device, use_bf16(device)):
        out = model(input_ids=cur.view(1, -1).to(device), use_cache=share_prefix)
        tok0 = torch.zeros(T, dtype=torch.float32)
        tok0[1:] = cross_entropy_fp32(out.logits[:, :-1], cur[1:].view(1, -1).to(device))[0].cpu()
        cache = output_cache(out) if share_prefix else None
        kv = None
        if cache is not None and hasattr(cache, "layers"):
            kv = [(layer.keys, layer.values) for layer in cache.layers]
    tok = tok0.view(1, -1).repeat(B, 1)
    order = torch.argsort(cand_pos, stable=True)
    sorted_pos = cand_pos[order].tolist()
    done = 0
    while done < B:
        rows_cap = min(sizer.size, max(1, max_rows_for(device) // T))
        if kv is None:
            end = min(B, done + rows_cap)
        else:
            end = plan_chunks(sorted_pos[done:], T, rows_cap, _overhead_rows(device))[0] + done
        idx = order[done:end]
        n = len(idx)
        s = sorted_pos[done] if kv is not None else 0  # 0: no shared prefix, full rows
        rows = cur[s:].view(1, -1).repeat(n, 1)
        rows[torch.arange(n), cand_pos[idx] - s] = cand_tok[idx]
        try:
            with torch.no_grad(), autocast(device, use_bf16(device)):
                kwargs: dict[str, Any] = {"use_cache": s > 0}
                if s > 0:
                    kwargs[cache_arg] = DynamicCache(
                        [(k[:, :, :s].expand(n, -1, -1, -1), v[:, :, :s].expand(n, -1, -1, -1)) for k, v in kv])
                logits = model(input_ids=rows.to(device), **kwargs).logits[:, :-1]
                ce = cross_entropy_fp32(logits, rows[:, 1:].to(device)).cpu()
        except RuntimeError as exc:
            if not is_oom(exc):
                raise
            sizer.shrink(exc)
            continue
        tok[idx, s + 1:] = ce  # positions <= s are predicted from the unchanged prefix
        done = end
    before = masked_mean(tok0.view(1, -1).expand(B, -1), masks)
    after = masked_mean(tok, masks)
    return before, after


def attack_text(
    model: nn.Module,
    text_ids: Sequence[int],
    cfg: HotFlipConfig,
    *,
    prefix: Sequence[int],
    allowed: torch.Tensor,
    method: Method = "gradient",
    gen: torch.Generator | None = None,
    sizer: BatchSizer | None = None,
    success_threshold: float = 0.15,
) -> dict[str, Any]:
    """Greedy flips on one text; returns the example record (see SCHEMA.md)."""
    if method == "control" and gen is None:
        raise ValueError("the control draws random candidates and needs an explicit generator")
    sizer = sizer or BatchSizer(cfg.score_batch_size)
    P, n = len(prefix), len(text_ids)
    orig = torch.as_tensor([*prefix, *text_ids], dtype=torch.long)
    base = base_targets(P, n)
    cur = orig.clone()
    flipped = torch.zeros_like(base)
    positions = torch.arange(P, P + n)
    trajectory: list[dict[str, Any]] = []
    stopped = "max_flips"
    for _ in range(cfg.max_flips):
        targets = base & ~flipped
        # a flip must leave at least one scored token
        open_pos = positions[~flipped[positions] & ((targets.sum() - targets[positions].long()) >= 1)]
        if len(open_pos) == 0:
            stopped = "no_positions"
            break
        if method == "control":
            cand_pos, cand_tok = _random_candidates(cur, open_pos, allowed, cfg.top_b, gen)
        else:
            cand_pos, cand_tok = _gradient_candidates(model, cur, targets, open_pos, allowed, cfg.top_b)
        B = len(cand_pos)
        if B == 0:
            stopped = "no_candidates"
            break
        before, after = score_flips(model, cur, targets, cand_pos, cand_tok, sizer=sizer)
        gains = after - before
        best = int(torch.argmax(gains))
        if not bool(gains[best] > 0):
            stopped = "no_gain"
            break
        pos, new = int(cand_pos[best]), int(cand_tok[best])
        trajectory.append({"position": pos - P, "old_id": int(cur[pos]), "new_id": new,
                           "loss_before": float(before[best]), "loss_after": float(after[best]),
                           "n_candidates": B})
        cur[pos] = new
        flipped[pos] = True
    final = base & ~flipped
    pair = torch.stack([orig, cur])
    losses = score_candidates_batched(model, pair, torch.ones_like(pair), final.view(1, -1).repeat(2, 1),
                                      batch_size=sizer)
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


# --------------------------------------------------------------------------- replay / transfer
def adversarial_batch(examples: Sequence[Mapping[str, Any]], prefix: Sequence[int]):
    """(clean, attacked) padded batches of the examples, both scored on the unflipped tokens."""
    seqs, adv, masks = [], [], []
    for ex in examples:
        orig = [*prefix, *ex["text_ids"]]
        new = list(orig)
        mask = base_targets(len(prefix), len(ex["text_ids"]))
        for pos, old, tok in zip(ex["positions"], ex["original_ids"], ex["new_ids"]):
            if orig[len(prefix) + pos] != old:
                raise ValueError(f"example {ex.get('index')}: recorded original token at {pos} does not match the text")
            new[len(prefix) + pos] = tok
            mask[len(prefix) + pos] = False
        seqs.append(orig)
        adv.append(new)
        masks.append(mask.tolist())
    return pad_batch(seqs, masks), pad_batch(adv, masks)


def replay_flips(model: nn.Module, examples: Sequence[Mapping[str, Any]], *, prefix: Sequence[int],
                 batch_size: int | BatchSizer = 64) -> dict[str, list[float]]:
    """Clean and attacked loss of recorded adversarial examples on another model (transfer)."""
    clean_b, adv_b = adversarial_batch(examples, prefix)
    sizer = batch_size if isinstance(batch_size, BatchSizer) else BatchSizer(batch_size)
    with attack_mode(model):
        clean = score_candidates_batched(model, clean_b.input_ids, clean_b.attention_mask, clean_b.target_mask,
                                         batch_size=sizer)
        attacked = score_candidates_batched(model, adv_b.input_ids, adv_b.attention_mask, adv_b.target_mask,
                                            batch_size=sizer)
    return {"index": [ex.get("index") for ex in examples], "clean": clean.tolist(), "attacked": attacked.tolist()}


def transfer_matrix(models: Mapping[str, nn.Module], examples: Mapping[str, Sequence[Mapping[str, Any]]], *,
                    prefix: Sequence[int], seed: int, success_threshold: float = 0.15) -> dict[str, Any]:
    """Every model's adversarial examples replayed on every model:
    `cells[source][target]` is the effect summary, `per_text` the paired losses."""
    cells: dict[str, dict[str, Any]] = {}
    per_text: dict[str, dict[str, Any]] = {}
    for src, exs in examples.items():
        cells[src], per_text[src] = {}, {}
        for name, model in models.items():
            res = replay_flips(model, exs, prefix=prefix)
            cells[src][name] = effect_summary(res["clean"], res["attacked"], threshold=success_threshold,
                                              seed=seed, tag=f"hotflip-transfer:{src}:{name}")
            per_text[src][name] = res
    return {"attack": "hotflip", "sources": list(examples), "models": list(models), "prefix_ids": list(prefix),
            "cells": cells, "per_text": per_text}


# --------------------------------------------------------------------------- the stage
def summarize_examples(records: Sequence[Mapping[str, Any]], *, threshold: float, seed: int, tag: str,
                       max_flips: int) -> dict[str, Any]:
    summary = effect_summary([r["clean_loss"] for r in records], [r["attacked_loss"] for r in records],
                             threshold=threshold, seed=seed, tag=tag)
    counts = Counter(r["flips_used"] for r in records)
    summary["flips_histogram"] = {str(k): counts.get(k, 0) for k in range(max_flips + 1)}
    summary["mean_flips"] = sum(r["flips_used"] for r in records) / len(records) if records else None
    summary["stopped"] = dict(Counter(r["stopped"] for r in records))
    return summary


def run_key(model: nn.Module, texts: Sequence[Sequence[int]], cfg: HotFlipConfig, *, seed: int,
            prefix: Sequence[int], allowed: torch.Tensor, method: Method, threshold: float) -> str:
    return digest_json({
        "attack": KINDS[method], "cfg": cfg.model_dump(mode="json", exclude={"random_control"}), "seed": seed,
        "model": model_fingerprint(model), "texts": digest_json([list(t) for t in texts]), "prefix": list(prefix),
        "allowed": digest_json(torch.nonzero(allowed).flatten().tolist()), "threshold": threshold,
    })


def run(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[Sequence[int]],
    cfg: HotFlipConfig,
    *,
    seed: int,
    out_dir: str | Path,
    allowed: torch.Tensor | None = None,
    success_threshold: float = 0.15,
    control: bool | None = None,
    progress: bool = True,
    log: logging.Logger | None = None,
    max_units: int | None = None,
) -> dict[str, Any]:
    """HotFlip on each text (at most `cfg.n_texts`, cut to `cfg.text_max_tokens`), then, when
    `control` (default `cfg.random_control`), the query-only random-candidate control on the same
    texts. Writes units, `hotflip_examples.jsonl`, `hotflip_control_examples.jsonl` (with the
    control) and `hotflip_results.json`; returns the results. `max_units` stops after that many
    newly computed blocks (returns `{"complete": False}`)."""
    log = log or default_log
    out_dir = Path(out_dir)
    control = cfg.random_control if control is None else control
    prefix = context_prefix(tokenizer)
    texts = truncate(texts[: cfg.n_texts], cfg.text_max_tokens)
    check_texts(texts, prefix, "texts")
    rows = model.get_input_embeddings().weight.shape[0]
    if allowed is None:
        allowed = allowed_token_mask(tokenizer, rows)
    if allowed.shape != (rows,):
        raise ValueError(f"allowed mask has shape {tuple(allowed.shape)}, the embedding has {rows} rows")
    allowed = allowed.cpu()
    methods: list[Method] = ["gradient", "control"] if control else ["gradient"]
    sizer = BatchSizer(cfg.score_batch_size)
    n_blocks = -(-len(texts) // cfg.block_size)
    records: dict[str, list[dict[str, Any]]] = {}
    computed = 0
    with attack_mode(model):
        for method in methods:
            kind = KINDS[method]
            key = run_key(model, texts, cfg, seed=seed, prefix=prefix, allowed=allowed, method=method,
                          threshold=success_threshold)
            records[method] = []
            bar = tqdm(total=len(texts), desc=kind, disable=(not progress) or None)
            for b in range(n_blocks):
                lo, hi = b * cfg.block_size, min(len(texts), (b + 1) * cfg.block_size)
                payload = units.read_unit(out_dir, kind, b, key)
                if payload is None:
                    if max_units is not None and computed >= max_units:
                        bar.close()
                        return {"complete": False, "units_done": computed}
                    block = []
                    for i in range(lo, hi):
                        gen = generator(seed, KINDS["control"], i) if method == "control" else None
                        rec = attack_text(model, texts[i], cfg, prefix=prefix, allowed=allowed, method=method,
                                          gen=gen, sizer=sizer, success_threshold=success_threshold)
                        block.append({"index": i, **rec})
                        bar.update(1)
                    payload = units.write_unit(out_dir, kind, b, key, {"block": b, "examples": block})
                    computed += 1
                    mean_inc = sum(r["abs_increase"] for r in payload["examples"]) / len(payload["examples"])
                    log.info("%s block %d/%d: mean loss increase %+.4f nats/token, flips %s", kind, b + 1,
                             n_blocks, mean_inc, [r["flips_used"] for r in payload["examples"]])
                else:
                    bar.update(hi - lo)
                records[method].extend(payload["examples"])
            bar.close()

    results: dict[str, Any] = {
        "attack": "hotflip", "complete": True, "seed": seed, "config": cfg.model_dump(mode="json"),
        "success_threshold": success_threshold, "prefix_ids": prefix, "n_texts": len(texts),
        "n_allowed_tokens": int(allowed.sum()),
    }
    for method in methods:
        recs = records[method]
        atomic_write_text(out_dir / EXAMPLE_FILES[method],
                          "".join(json.dumps({**r, "method": method, "prefix_ids": prefix}) + "\n" for r in recs))
        results[method] = summarize_examples(recs, threshold=success_threshold, seed=seed, tag=f"hotflip-{method}",
                                             max_flips=cfg.max_flips)
    results["control"] = results.get("control")
    results["gradient_vs_control"] = (
        stats.paired_test([r["abs_increase"] for r in records["gradient"]],
                          [r["abs_increase"] for r in records["control"]]) if control else None)
    atomic_write_json(out_dir / "hotflip_results.json", results)
    g = results["gradient"]
    log.info("hotflip on %d texts: +%.4f nats/token (%+.1f%%), success %.0f%%, mean flips %.2f%s", g["n_texts"],
             g["abs_increase"]["mean"], 100 * g["rel_increase"]["mean"], 100 * g["success_rate"]["rate"],
             g["mean_flips"], "" if not control else
             f"; random control +{results['control']['abs_increase']['mean']:.4f} nats/token")
    return results
