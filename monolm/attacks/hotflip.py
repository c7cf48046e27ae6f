"""HotFlip (Ebrahimi et al. 2018), stage 6, with a query-only control.

Per text (prefixed with the one-token context of `common.context_prefix`), up to `max_flips`
greedy flips (`flip_search`):

1. the gradient of the loss on the still-unflipped text tokens w.r.t. the input embeddings gives
   the first-order score `g_i · (E_v - E_{x_i})` of every swap (position i, token v) at every
   not-yet-flipped text position and every allowed token;
2. the top `top_b` swaps are re-scored exactly, in batched forward passes (`flip_scoring`);
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

import functools
import json
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from monolm import stats
from monolm.attacks import units
from monolm.attacks.effects import effect_summary
from monolm.attacks.flip_search import Method, attack_text, base_targets
from monolm.attacks.scoring import AttackSetup, BatchSizer, attack_mode
from monolm.attacks.sequences import TextBatch, check_texts, checked_allowed_mask, context_prefix, pad_batch, truncate
from monolm.config import HotFlipConfig
from monolm.core.artifacts import atomic_write_json, atomic_write_text
from monolm.core.deadline import check_deadline
from monolm.core.progress import OnLog, Progress
from monolm.core.runtime import Bf16, generator

default_log = logging.getLogger("monolm.attacks")
KINDS: dict[str, str] = {"gradient": "hotflip", "control": "hotflip_control"}
EXAMPLE_FILES: dict[str, str] = {"gradient": "hotflip_examples.jsonl", "control": "hotflip_control_examples.jsonl"}


# --------------------------------------------------------------------------- replay / transfer
def adversarial_batch(examples: Sequence[Mapping[str, Any]], prefix: Sequence[int]) -> tuple[TextBatch, TextBatch]:
    """(clean, attacked) padded batches of the examples, both scored on the unflipped tokens."""
    seqs, adv, masks = [], [], []
    for ex in examples:
        orig = [*prefix, *ex["text_ids"]]
        new = list(orig)
        mask = base_targets(len(prefix), len(ex["text_ids"]))
        for pos, old, tok in zip(ex["positions"], ex["original_ids"], ex["new_ids"], strict=True):
            if orig[len(prefix) + pos] != old:
                raise ValueError(f"example {ex.get('index')}: recorded original token at {pos} does not match the text")
            new[len(prefix) + pos] = tok
            mask[len(prefix) + pos] = False
        seqs.append(orig)
        adv.append(new)
        masks.append(mask.tolist())
    return pad_batch(seqs, masks), pad_batch(adv, masks)


def replay_flips(
    model: nn.Module,
    examples: Sequence[Mapping[str, Any]],
    *,
    prefix: Sequence[int],
    batch_size: int | BatchSizer = 64,
    bf16: Bf16 = "auto",
) -> dict[str, list[float]]:
    """Clean and attacked loss of recorded adversarial examples on another model (transfer)."""
    clean_b, adv_b = adversarial_batch(examples, prefix)
    setup = AttackSetup.of(model, prefix, batch_size, bf16)
    with attack_mode(model):
        clean, attacked = setup.losses(clean_b), setup.losses(adv_b)
    return {"index": [ex.get("index") for ex in examples], "clean": clean.tolist(), "attacked": attacked.tolist()}


def transfer_matrix(
    models: Mapping[str, nn.Module],
    examples: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    prefix: Sequence[int],
    seed: int,
    success_threshold: float = 0.15,
    bf16: Bf16 = "auto",
) -> dict[str, Any]:
    """Every model's adversarial examples replayed on every model:
    `cells[source][target]` is the effect summary, `per_text` the paired losses."""
    cells: dict[str, dict[str, Any]] = {}
    per_text: dict[str, dict[str, Any]] = {}
    for src, exs in examples.items():
        cells[src], per_text[src] = {}, {}
        for name, model in models.items():
            res = replay_flips(model, exs, prefix=prefix, bf16=bf16)
            cells[src][name] = effect_summary(res["clean"], res["attacked"], threshold=success_threshold, seed=seed)
            per_text[src][name] = res
    return {
        "attack": "hotflip",
        "sources": list(examples),
        "models": list(models),
        "prefix_ids": list(prefix),
        "cells": cells,
        "per_text": per_text,
    }


# --------------------------------------------------------------------------- the stage
def summarize_examples(
    records: Sequence[Mapping[str, Any]], *, threshold: float, seed: int, max_flips: int
) -> dict[str, Any]:
    summary = effect_summary(
        [r["clean_loss"] for r in records], [r["attacked_loss"] for r in records], threshold=threshold, seed=seed
    )
    counts = Counter(r["flips_used"] for r in records)
    summary["flips_histogram"] = {str(k): counts.get(k, 0) for k in range(max_flips + 1)}
    summary["mean_flips"] = sum(r["flips_used"] for r in records) / len(records) if records else None
    summary["stopped"] = dict(Counter(r["stopped"] for r in records))
    return summary


def run_key(
    model: nn.Module,
    texts: Sequence[Sequence[int]],
    cfg: HotFlipConfig,
    *,
    seed: int,
    prefix: Sequence[int],
    allowed: torch.Tensor,
    method: Method,
    threshold: float,
) -> str:
    """Digest of everything a block's result depends on (see `units`)."""
    return units.digest_json(
        {
            "attack": KINDS[method],
            "cfg": cfg.model_dump(mode="json", exclude={"random_control"}),
            "seed": seed,
            "model": units.model_fingerprint(model),
            "texts": units.digest_json([list(t) for t in texts]),
            "prefix": list(prefix),
            "allowed": units.digest_json(torch.nonzero(allowed).flatten().tolist()),
            "threshold": threshold,
        }
    )


def _block_units(
    attack: Callable[[int], dict[str, Any]],
    kind: str,
    n_texts: int,
    block_size: int,
    key: str,
    out_dir: Path,
    budget: int | None,
    progress: bool,
    tracker: Progress,
) -> tuple[list[dict[str, Any]], int, bool]:
    """`(records, blocks computed, complete)` of one method: each block of `block_size` texts is a
    unit, reused when finished, else computed with `attack(i)` per text and written. Incomplete
    once `budget` blocks were computed (None: no limit) and another one is missing. Each block is
    a progress line: its mean loss increase, the mean so far, and the time left (`tracker`)."""
    n_blocks = -(-n_texts // block_size)
    records: list[dict[str, Any]] = []
    computed = 0
    bar = tqdm(total=n_texts, desc=kind, disable=(not progress) or None)
    for b in range(n_blocks):
        lo, hi = b * block_size, min(n_texts, (b + 1) * block_size)
        payload = units.read_unit(out_dir, kind, b, key)
        reused = payload is not None
        if payload is None:
            if budget is not None and computed >= budget:
                bar.close()
                return records, computed, False
            block = []
            for i in range(lo, hi):
                check_deadline("between HotFlip texts")
                block.append({"index": i, **attack(i)})
                bar.update(1)
            payload = units.write_unit(out_dir, kind, b, key, {"block": b, "examples": block})
            computed += 1
        else:
            bar.update(hi - lo)
        records.extend(payload["examples"])
        mean_inc = _mean([r["abs_increase"] for r in payload["examples"]])
        so_far = _mean([r["abs_increase"] for r in records])
        tracker.update(
            tracker.done + 1,
            f"{kind} block {b + 1}/{n_blocks}{' (reused)' if reused else ''}: mean loss increase "
            f"{mean_inc:+.4f} nats/token ({so_far:+.4f} over {len(records)} texts so far), "
            f"flips {[r['flips_used'] for r in payload['examples']]}",
            reused=reused,
            loss_increase=so_far,
        )
    bar.close()
    return records, computed, True


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


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
    log: logging.Logger | logging.LoggerAdapter | None = None,
    max_units: int | None = None,
    bf16: Bf16 = "auto",
    on_log: OnLog | None = None,
) -> dict[str, Any]:
    """HotFlip on each text (at most `cfg.n_texts`, cut to `cfg.text_max_tokens`), then, when
    `control` (default `cfg.random_control`), the query-only random-candidate control on the same
    texts. Writes units, `hotflip_examples.jsonl`, `hotflip_control_examples.jsonl` (with the
    control) and `hotflip_results.json`; returns the results. `max_units` stops after that many
    newly computed blocks (returns `{"complete": False}`). `bf16` is the autocast setting
    (`runtime.bf16_enabled`: on CUDA only). Every block is a log line with the loss increase so
    far and the time left, and a progress event for `on_log` (`monolm.core.progress`)."""
    log = log or default_log
    out_dir = Path(out_dir)
    control = cfg.random_control if control is None else control
    prefix = context_prefix(tokenizer)
    texts = truncate(texts[: cfg.n_texts], cfg.text_max_tokens)
    check_texts(texts, prefix, "texts")
    allowed = checked_allowed_mask(model, tokenizer, allowed)
    methods: list[Method] = ["gradient", "control"] if control else ["gradient"]
    setup = AttackSetup.of(model, prefix, cfg.score_batch_size, bf16)
    records: dict[str, list[dict[str, Any]]] = {}
    computed = 0
    tracker = Progress(-(-len(texts) // cfg.block_size) * len(methods), log=log, on_log=on_log, what="hotflip")
    with attack_mode(model):
        for method in methods:
            attack = functools.partial(_attack_example, setup, texts, cfg, allowed, method, seed, success_threshold)
            key = run_key(
                model, texts, cfg, seed=seed, prefix=prefix, allowed=allowed, method=method, threshold=success_threshold
            )
            budget = None if max_units is None else max_units - computed
            records[method], done, complete = _block_units(
                attack, KINDS[method], len(texts), cfg.block_size, key, out_dir, budget, progress, tracker
            )
            computed += done
            if not complete:
                return {"complete": False, "units_done": computed}
    results = _write_results(out_dir, records, cfg, seed, prefix, len(texts), int(allowed.sum()), success_threshold)
    _log_results(log, results)
    return results


def _attack_example(
    setup: AttackSetup,
    texts: Sequence[Sequence[int]],
    cfg: HotFlipConfig,
    allowed: torch.Tensor,
    method: Method,
    seed: int,
    threshold: float,
    i: int,
) -> dict[str, Any]:
    """Text `i` attacked with `method`; the control draws from its own generator per text."""
    gen = generator(seed, KINDS["control"], i) if method == "control" else None
    return attack_text(setup, texts[i], cfg, allowed=allowed, method=method, gen=gen, success_threshold=threshold)


def _write_results(
    out_dir: Path,
    records: dict[str, list[dict[str, Any]]],
    cfg: HotFlipConfig,
    seed: int,
    prefix: list[int],
    n_texts: int,
    n_allowed: int,
    success_threshold: float,
) -> dict[str, Any]:
    """Write each method's examples (`EXAMPLE_FILES`) and `hotflip_results.json`; return the results."""
    results: dict[str, Any] = {
        "attack": "hotflip",
        "complete": True,
        "seed": seed,
        "config": cfg.model_dump(mode="json"),
        "success_threshold": success_threshold,
        "prefix_ids": prefix,
        "n_texts": n_texts,
        "n_allowed_tokens": n_allowed,
    }
    for method, recs in records.items():
        atomic_write_text(
            out_dir / EXAMPLE_FILES[method],
            "".join(json.dumps({**r, "method": method, "prefix_ids": prefix}) + "\n" for r in recs),
        )
        results[method] = summarize_examples(recs, threshold=success_threshold, seed=seed, max_flips=cfg.max_flips)
    control = "control" in records
    results["control"] = results.get("control")
    results["gradient_vs_control"] = (
        stats.paired_test(
            [r["abs_increase"] for r in records["gradient"]], [r["abs_increase"] for r in records["control"]]
        )
        if control
        else None
    )
    atomic_write_json(out_dir / "hotflip_results.json", results)
    return results


def _log_results(log: logging.Logger, results: dict[str, Any]) -> None:
    g, c = results["gradient"], results["control"]
    log.info(
        "hotflip on %d texts: +%.4f nats/token (%+.1f%%), success %.0f%%, mean flips %.2f%s",
        g["n_texts"],
        g["abs_increase"]["mean"],
        100 * g["rel_increase"]["mean"],
        100 * g["success_rate"]["rate"],
        g["mean_flips"],
        "" if c is None else f"; random control +{c['abs_increase']['mean']:.4f} nats/token",
    )
