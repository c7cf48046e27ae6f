"""Universal adversarial triggers (Wallace et al. 2019), stage 5.

A trigger of `trigger_len` tokens is prepended to every text (after the one-token context
prefix, see `common.context_prefix`) and optimised to *raise* the model's loss on the original
text tokens. Per restart, per sweep, per trigger position:

1. the gradient of the mean loss over a batch of optimisation texts w.r.t. the input embeddings
   gives the first-order score `g_p · E_v` of every allowed token `v` at position `p`;
2. the top-k tokens (plus the current one) are re-scored exactly, all k trigger variants over the
   whole batch in batched forward passes;
3. the best variant is kept if it raises the batch loss above the current trigger's loss (both
   from the same batched forward pass, so the comparison is exact).

A restart ends after a sweep that changed nothing or after `max_sweeps`. `restarts` restarts
start from different random triggers (allowed tokens, drawn from a generator seeded with
(seed, "uat", restart)); the trigger with the highest loss over *all* optimisation texts wins.
It is then reported on the disjoint evaluation texts: clean and attacked loss per text, absolute
increase (nats/token) first, relative increase second, success rate, all with CIs.

Each restart is a resumable unit (`units/uat-<r>.json`), so a killed run continues where it
stopped and ends with exactly the result of an uninterrupted one.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from monolm.artifacts import atomic_write_json
from monolm.attacks import units
from monolm.attacks.common import (
    BatchSizer,
    TextBatch,
    attack_mode,
    check_texts,
    checked_allowed_mask,
    context_prefix,
    digest_json,
    embedding_gradient,
    first_order_scores,
    model_fingerprint,
    pad_batch,
    score_candidates_batched,
    text_target_mask,
    truncate,
)
from monolm.attacks.effects import effect_summary, per_text_effects
from monolm.config import UATConfig
from monolm.runtime import Bf16, bf16_enabled, generator, model_device

default_log = logging.getLogger("monolm.attacks")
KIND = "uat"
STAGE = "uat"
NO_TRIGGER = torch.zeros((1, 0), dtype=torch.long)


# --------------------------------------------------------------------------- sequences
def _text_batch(texts: Sequence[Sequence[int]], has_prefix: bool) -> TextBatch:
    """The texts alone, right-padded, with their target masks (every text token, except the
    first one when there is no prefix to predict it from)."""
    return pad_batch(texts, [text_target_mask(0, len(t), has_prefix=has_prefix) for t in texts])


def _with_triggers(prefix: Sequence[int], triggers: torch.Tensor, texts: TextBatch) -> TextBatch:
    """Rows `prefix + triggers[c] + texts[b]`, candidate-major (row = c * n_texts + b).

    Prefix and trigger positions are attended but never targets; only text tokens are."""
    C, L = triggers.shape
    B = texts.input_ids.shape[0]
    head = torch.cat([torch.as_tensor(list(prefix), dtype=torch.long).view(1, -1).expand(C, -1), triggers], 1)
    n_head = head.shape[1]
    ids = torch.cat([head.repeat_interleave(B, 0), texts.input_ids.repeat(C, 1)], 1)
    am = torch.cat([torch.ones((C * B, n_head), dtype=torch.long), texts.attention_mask.repeat(C, 1)], 1)
    tm = torch.cat([torch.zeros((C * B, n_head), dtype=torch.bool), texts.target_mask.repeat(C, 1)], 1)
    return TextBatch(ids, am, tm)


def _trigger_row(trigger_ids: Sequence[int]) -> torch.Tensor:
    return torch.as_tensor(list(trigger_ids), dtype=torch.long).view(1, -1)


def trigger_batch(prefix: Sequence[int], trigger_ids: Sequence[int], texts: Sequence[Sequence[int]]) -> TextBatch:
    """`prefix + trigger + text` for each text, with the target mask the attack scores (public so
    tests can check that no trigger or prefix position is ever a target)."""
    return _with_triggers(prefix, _trigger_row(trigger_ids), _text_batch(texts, bool(prefix)))


# --------------------------------------------------------------------------- evaluation, transfer
def _clean_and_attacked(
    model: nn.Module, trigger_ids: Sequence[int], texts: TextBatch, *, prefix: Sequence[int], sizer: BatchSizer,
    bf16: bool,
) -> dict[str, list[float]]:
    clean = score_candidates_batched(model, _with_triggers(prefix, NO_TRIGGER, texts), batch_size=sizer, bf16=bf16)
    attacked = score_candidates_batched(model, _with_triggers(prefix, _trigger_row(trigger_ids), texts),
                                        batch_size=sizer, bf16=bf16)
    return {"clean": clean.tolist(), "attacked": attacked.tolist()}


def evaluate_trigger(
    model: nn.Module,
    trigger_ids: Sequence[int],
    texts: Sequence[Sequence[int]],
    *,
    prefix: Sequence[int],
    batch_size: int | BatchSizer = 64,
    bf16: Bf16 = "auto",
) -> dict[str, list[float]]:
    """Per-text clean and attacked loss (mean CE over the same original text tokens)."""
    check_texts(texts, prefix, "texts")
    sizer = batch_size if isinstance(batch_size, BatchSizer) else BatchSizer(batch_size)
    with attack_mode(model):
        return _clean_and_attacked(model, trigger_ids, _text_batch(texts, bool(prefix)), prefix=prefix, sizer=sizer,
                                   bf16=bf16_enabled(bf16, model_device(model), cuda_only=True))


def transfer_matrix(
    models: Mapping[str, nn.Module],
    triggers: Mapping[str, Sequence[int]],
    eval_texts: Sequence[Sequence[int]],
    *,
    prefix: Sequence[int],
    seed: int,
    success_threshold: float = 0.15,
    text_max_tokens: int | None = None,
    batch_size: int = 64,
    bf16: Bf16 = "auto",
) -> dict[str, Any]:
    """Every trigger on every model: `cells[trigger_source][target_model]` is the effect summary
    (absolute increase first) and `per_text` the paired per-text losses, for paired tests."""
    texts = truncate(eval_texts, text_max_tokens) if text_max_tokens else [list(t) for t in eval_texts]
    cells: dict[str, dict[str, Any]] = {}
    per_text: dict[str, dict[str, Any]] = {}
    for src, trig in triggers.items():
        cells[src], per_text[src] = {}, {}
        for name, model in models.items():
            res = evaluate_trigger(model, trig, texts, prefix=prefix, batch_size=batch_size, bf16=bf16)
            cells[src][name] = effect_summary(res["clean"], res["attacked"], threshold=success_threshold,
                                              seed=seed, tag=f"uat-transfer:{src}:{name}")
            per_text[src][name] = res
    return {"attack": "uat", "triggers": {k: list(v) for k, v in triggers.items()}, "models": list(models),
            "n_texts": len(texts), "prefix_ids": list(prefix), "cells": cells, "per_text": per_text}


# --------------------------------------------------------------------------- optimisation
def _grad_batch(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Indices of the optimisation texts used for one position step (all of them if they fit)."""
    if size >= n:
        return torch.arange(n)
    return torch.sort(torch.randperm(n, generator=gen)[:size]).values


def _position_step(
    model: nn.Module, texts: TextBatch, trigger: torch.Tensor, p: int, k: int, *, prefix: Sequence[int],
    allowed: torch.Tensor, sizer: BatchSizer, bf16: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The current token at trigger position `p` and its top-`k` first-order replacements
    (candidate 0 is the current token), with each candidate trigger's exact mean loss over `texts`."""
    cur = _with_triggers(prefix, trigger.view(1, -1), texts).to(model_device(model))
    grad, _ = embedding_gradient(model, cur.input_ids, cur.attention_mask, cur.target_mask, bf16=bf16)
    g = grad[:, len(prefix) + p, :].mean(0, keepdim=True)  # gradient of the mean loss
    scores = first_order_scores(g, model.get_input_embeddings().weight.detach(), allowed)[0]
    scores[trigger[p]] = float("-inf")
    top = torch.topk(scores, k).indices.cpu()
    tokens = torch.cat([trigger[p].view(1), top])  # candidate 0 = the current trigger
    cands = trigger.view(1, -1).repeat(len(tokens), 1)
    cands[:, p] = tokens
    batch = _with_triggers(prefix, cands, texts)
    losses = score_candidates_batched(model, batch, batch_size=sizer, bf16=bf16)
    return tokens, losses.view(len(tokens), texts.input_ids.shape[0]).mean(1)


def optimise_restart(
    model: nn.Module,
    opt: TextBatch,
    cfg: UATConfig,
    *,
    prefix: Sequence[int],
    allowed: torch.Tensor,
    gen: torch.Generator,
    sizer: BatchSizer,
    bf16: bool = False,
    progress: bool = False,
    desc: str = "uat",
) -> dict[str, Any]:
    """One restart: random allowed initial trigger, then greedy sweeps until no change."""
    allowed_ids = torch.nonzero(allowed).flatten()
    trigger = allowed_ids[torch.randint(len(allowed_ids), (cfg.trigger_len,), generator=gen)]
    initial = trigger.tolist()
    n = opt.input_ids.shape[0]
    k = min(cfg.top_k, int(allowed.sum()) - 1)
    steps: list[dict[str, Any]] = []
    converged = False
    sweeps = 0
    bar = tqdm(total=cfg.max_sweeps * cfg.trigger_len, desc=desc, disable=(not progress) or None, leave=False)
    for sweep in range(cfg.max_sweeps):
        sweeps += 1
        changed = False
        for p in range(cfg.trigger_len):
            idx = _grad_batch(n, cfg.grad_batch_size, gen)
            tokens, losses = _position_step(model, opt.rows(idx), trigger, p, k, prefix=prefix, allowed=allowed,
                                            sizer=sizer, bf16=bf16)
            best = int(torch.argmax(losses[1:])) + 1
            accept = bool(losses[best] > losses[0])
            steps.append({"sweep": sweep, "position": p, "n_texts": len(idx), "loss_before": float(losses[0]),
                          "best_candidate_loss": float(losses[best]), "token_before": int(trigger[p]),
                          "token_after": int(tokens[best]) if accept else int(trigger[p]), "accepted": accept})
            if accept:
                trigger[p] = tokens[best]
                changed = True
            bar.update(1)
            bar.set_postfix(loss=f"{float(losses[best] if accept else losses[0]):.3f}")
        if not changed:
            converged = True
            break
    bar.close()
    return {"initial_trigger_ids": initial, "trigger_ids": trigger.tolist(), "sweeps": sweeps,
            "converged": converged, "steps": steps}


def run_key(model: nn.Module, opt_texts: Sequence[Sequence[int]], cfg: UATConfig, *, seed: int,
            prefix: Sequence[int], allowed: torch.Tensor) -> str:
    """Digest of everything a restart's result depends on (see `units`)."""
    return digest_json({
        "attack": KIND, "cfg": cfg.model_dump(mode="json"), "seed": seed, "model": model_fingerprint(model),
        "opt_texts": digest_json([list(t) for t in opt_texts]), "prefix": list(prefix),
        "allowed": digest_json(torch.nonzero(allowed).flatten().tolist()),
    })


# --------------------------------------------------------------------------- the stage
def _held_out_texts(opt_texts: Sequence[Sequence[int]], eval_texts: Sequence[Sequence[int]], cfg: UATConfig,
                    prefix: Sequence[int]) -> tuple[list[list[int]], list[list[int]]]:
    """The optimisation and evaluation texts, cut to size, checked to be scorable and disjoint."""
    opt = truncate(opt_texts[: cfg.n_opt_texts], cfg.text_max_tokens)
    ev = truncate(eval_texts[: cfg.n_eval_texts], cfg.text_max_tokens)
    check_texts(opt, prefix, "opt_texts")
    check_texts(ev, prefix, "eval_texts")
    shared = {tuple(t) for t in opt} & {tuple(t) for t in ev}
    if shared:
        raise ValueError(f"{len(shared)} evaluation texts also occur among the optimisation texts; "
                         "the trigger must be reported on held-out texts")
    return opt, ev


def _restart(model: nn.Module, opt: TextBatch, cfg: UATConfig, r: int, *, seed: int, prefix: Sequence[int],
             allowed: torch.Tensor, sizer: BatchSizer, bf16: bool, progress: bool) -> dict[str, Any]:
    """Restart `r` from its own seeded generator, with its trigger's loss over all optimisation texts."""
    result = optimise_restart(model, opt, cfg, prefix=prefix, allowed=allowed, gen=generator(seed, STAGE, r),
                              sizer=sizer, bf16=bf16, progress=progress, desc=f"uat restart {r}")
    batch = _with_triggers(prefix, _trigger_row(result["trigger_ids"]), opt)
    per_text = score_candidates_batched(model, batch, batch_size=sizer, bf16=bf16).tolist()
    result.update(restart=r, opt_loss=sum(per_text) / len(per_text))
    return result


def _restart_units(compute: Callable[[int], dict[str, Any]], tokenizer: Any, n_restarts: int, *, key: str,
                   out_dir: Path, max_units: int | None, log: logging.Logger) -> tuple[list[dict[str, Any]], bool]:
    """`(payloads, complete)`: restart r's finished unit is reused, a missing one is computed with
    `compute(r)` and written. Incomplete once `max_units` restarts were computed and more are missing."""
    restarts: list[dict[str, Any]] = []
    computed = 0
    for r in range(n_restarts):
        payload = units.read_unit(out_dir, KIND, r, key)
        if payload is not None:
            log.info("uat restart %d/%d: reused finished unit (opt loss %.4f)", r + 1, n_restarts,
                     payload["opt_loss"])
        elif max_units is not None and computed >= max_units:
            return restarts, False
        else:
            payload = units.write_unit(out_dir, KIND, r, key, compute(r))
            computed += 1
            log.info("uat restart %d/%d: opt loss %.4f after %d sweeps%s, trigger %r", r + 1, n_restarts,
                     payload["opt_loss"], payload["sweeps"], " (converged)" if payload["converged"] else "",
                     tokenizer.decode(payload["trigger_ids"]))
        restarts.append(payload)
    return restarts, True


def run(
    model: nn.Module,
    tokenizer: Any,
    opt_texts: Sequence[Sequence[int]],
    eval_texts: Sequence[Sequence[int]],
    cfg: UATConfig,
    *,
    seed: int,
    out_dir: str | Path,
    allowed: torch.Tensor | None = None,
    success_threshold: float = 0.15,
    progress: bool = True,
    log: logging.Logger | None = None,
    max_units: int | None = None,
    bf16: Bf16 = "auto",
) -> dict[str, Any]:
    """Learn a universal trigger on `opt_texts` and report its effect on `eval_texts`.

    Texts are token ids, cut to `cfg.text_max_tokens`; at most `cfg.n_opt_texts` /
    `cfg.n_eval_texts` are used. `allowed` (bool over embedding rows) defaults to
    `allowed_token_mask(tokenizer, rows)`. Writes `units/uat-<r>.json` per restart, then
    `triggers.json` and `uat_results.json` (schemas in SCHEMA.md) and returns the results.
    `max_units` stops after computing that many new restarts (returns `{"complete": False}`),
    which is how tests simulate a run killed part-way. `bf16` is the autocast setting
    (`runtime.bf16_enabled`: on CUDA only).
    """
    log = log or default_log
    out_dir = Path(out_dir)
    prefix = context_prefix(tokenizer)
    opt, ev = _held_out_texts(opt_texts, eval_texts, cfg, prefix)
    allowed = checked_allowed_mask(model, tokenizer, allowed)
    sizer = BatchSizer(cfg.score_batch_size)
    opt_batch = _text_batch(opt, bool(prefix))
    on = bf16_enabled(bf16, model_device(model), cuda_only=True)
    with attack_mode(model):
        key = run_key(model, opt, cfg, seed=seed, prefix=prefix, allowed=allowed)
        compute = functools.partial(_restart, model, opt_batch, cfg, seed=seed, prefix=prefix, allowed=allowed,
                                    sizer=sizer, bf16=on, progress=progress)
        restarts, complete = _restart_units(compute, tokenizer, cfg.restarts, key=key, out_dir=out_dir,
                                            max_units=max_units, log=log)
        if not complete:
            return {"complete": False, "units_done": len(restarts)}
        best = max(restarts, key=lambda u: (u["opt_loss"], -u["restart"]))
        clean_opt = score_candidates_batched(model, _with_triggers(prefix, NO_TRIGGER, opt_batch), batch_size=sizer,
                                             bf16=on).tolist()
        evaluation = _clean_and_attacked(model, best["trigger_ids"], _text_batch(ev, bool(prefix)), prefix=prefix,
                                         sizer=sizer, bf16=on)
    triggers = _triggers_record(tokenizer, cfg, prefix, restarts, best)
    results = {
        "attack": "uat",
        "complete": True,
        "seed": seed,
        "config": cfg.model_dump(mode="json"),
        "success_threshold": success_threshold,
        "run_key": key,
        "prefix_ids": prefix,
        "n_opt_texts": len(opt),
        "n_eval_texts": len(ev),
        "n_allowed_tokens": int(allowed.sum()),
        "best_restart": best["restart"],
        "trigger_ids": best["trigger_ids"],
        "trigger_text": triggers["best"]["trigger_text"],
        "opt": {"clean_loss": sum(clean_opt) / len(clean_opt), "attacked_loss": best["opt_loss"]},
        "eval": effect_summary(evaluation["clean"], evaluation["attacked"], threshold=success_threshold,
                               seed=seed, tag="uat-eval"),
        "per_text": {**evaluation, **per_text_effects(evaluation["clean"], evaluation["attacked"],
                                                      success_threshold)},
    }
    atomic_write_json(out_dir / "triggers.json", triggers)
    atomic_write_json(out_dir / "uat_results.json", results)
    _log_effect(log, results["eval"])
    return results


def _triggers_record(tokenizer: Any, cfg: UATConfig, prefix: Sequence[int], restarts: list[dict[str, Any]],
                     best: dict[str, Any]) -> dict[str, Any]:
    """`triggers.json`: every restart's initial and final trigger, and the best one."""
    return {
        "prefix_ids": prefix,
        "trigger_len": cfg.trigger_len,
        "restarts": [{"restart": u["restart"], "initial_trigger_ids": u["initial_trigger_ids"],
                      "trigger_ids": u["trigger_ids"], "trigger_text": tokenizer.decode(u["trigger_ids"]),
                      "opt_loss": u["opt_loss"], "sweeps": u["sweeps"], "converged": u["converged"]}
                     for u in restarts],
        "best": {"restart": best["restart"], "trigger_ids": best["trigger_ids"],
                 "trigger_text": tokenizer.decode(best["trigger_ids"]), "opt_loss": best["opt_loss"]},
    }


def _log_effect(log: logging.Logger, e: dict[str, Any]) -> None:
    log.info("uat on %d held-out texts: clean %.4f -> attacked %.4f nats/token (+%.4f, %+.1f%%), success %.0f%%",
             e["n_texts"], e["clean_loss"]["mean"], e["attacked_loss"]["mean"], e["abs_increase"]["mean"],
             100 * e["rel_increase"]["mean"], 100 * e["success_rate"]["rate"])
