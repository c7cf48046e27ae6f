"""Universal adversarial triggers (Wallace et al. 2019), stage 5.

A trigger of `trigger_len` tokens is prepended to every text (after the one-token context
prefix, see `common.context_prefix`) and optimised to *raise* the model's loss on the original
text tokens. Per restart, per sweep, per trigger position (`trigger_search`):

1. the gradient of the mean loss over a batch of optimisation texts w.r.t. the input embeddings
   gives the first-order score `g_p · E_v` of every allowed token `v` at position `p`;
2. the top-k tokens (plus the current one) are re-scored exactly, all k trigger variants over the
   whole batch in batched forward passes;
3. the best variant is kept if it raises the batch loss above the current trigger's loss (both
   from the same batched forward pass, so the comparison is exact).

Candidates follow the threat model GCG shares (`monolm.attacks.typeable`): printable-ASCII tokens
unless `allow_non_ascii`, and with `filter_ids` (the default) only variants whose decoded text
encodes back to the same ids; step 2 then re-scores the top-k variants that pass.

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

from monolm.attacks import curves, units
from monolm.attacks.effects import effect_summary, per_text_effects
from monolm.attacks.replicates import restart_effects
from monolm.attacks.scoring import AttackSetup, BatchSizer, attack_mode
from monolm.attacks.sequences import TextBatch, check_texts, truncate
from monolm.attacks.trigger_search import (
    TriggerRun,
    clean_losses,
    optimise_restart,
    text_batch,
    trigger_row,
    with_triggers,
)
from monolm.attacks.typeable import Keep, roundtrip_filter, trigger_vocabulary
from monolm.config import UATConfig
from monolm.core.artifacts import atomic_write_json
from monolm.core.deadline import check_deadline
from monolm.core.progress import OnLog, Progress
from monolm.core.runtime import Bf16, generator

default_log = logging.getLogger("monolm.attacks")
KIND = "uat"
STAGE = "uat"


# --------------------------------------------------------------------------- evaluation, transfer
def _clean_and_attacked(setup: AttackSetup, trigger_ids: Sequence[int], texts: TextBatch) -> dict[str, list[float]]:
    clean = clean_losses(setup, texts)
    attacked = setup.losses(with_triggers(setup.prefix, trigger_row(trigger_ids), texts))
    return {"clean": clean, "attacked": attacked.tolist()}


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
    setup = AttackSetup.of(model, prefix, batch_size, bf16)
    with attack_mode(model):
        return _clean_and_attacked(setup, trigger_ids, text_batch(texts, bool(prefix)))


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
            cells[src][name] = effect_summary(res["clean"], res["attacked"], threshold=success_threshold, seed=seed)
            per_text[src][name] = res
    return {
        "attack": "uat",
        "triggers": {k: list(v) for k, v in triggers.items()},
        "models": list(models),
        "n_texts": len(texts),
        "prefix_ids": list(prefix),
        "cells": cells,
        "per_text": per_text,
    }


def run_key(
    model: nn.Module,
    opt_texts: Sequence[Sequence[int]],
    cfg: UATConfig,
    *,
    seed: int,
    prefix: Sequence[int],
    allowed: torch.Tensor,
) -> str:
    """Digest of everything a restart's result depends on (see `units`)."""
    return units.trigger_run_key(model, opt_texts, cfg, kind=KIND, seed=seed, prefix=prefix, allowed=allowed)


# --------------------------------------------------------------------------- the stage
def _restart(
    setup: AttackSetup,
    opt: TextBatch,
    cfg: UATConfig,
    allowed: torch.Tensor,
    seed: int,
    progress: bool,
    tracker: Progress,
    clean_loss: float,
    keep: Keep | None,
    r: int,
) -> dict[str, Any]:
    """Restart `r` from its own seeded generator, with its trigger's loss over all optimisation
    texts; each sweep is a progress line (the sweep's batch loss over the clean loss)."""
    gen = generator(seed, STAGE, r)

    def on_sweep(sweep: int, batch_loss: float) -> None:
        tracker.update(
            r * cfg.max_sweeps + sweep,
            f"uat restart {r + 1}/{cfg.restarts} sweep {sweep}/{cfg.max_sweeps}: batch loss {batch_loss:.4f} "
            f"({batch_loss - clean_loss:+.4f} over clean)",
            loss_increase=batch_loss - clean_loss,
        )

    result = optimise_restart(
        setup,
        opt,
        cfg,
        allowed=allowed,
        gen=gen,
        progress=progress,
        desc=f"uat restart {r}",
        on_sweep=on_sweep,
        keep=keep,
    )
    per_text = setup.losses(with_triggers(setup.prefix, trigger_row(result["trigger_ids"]), opt)).tolist()
    result.update(restart=r, opt_loss=sum(per_text) / len(per_text))
    return result


def _restart_units(
    compute: Callable[[int], dict[str, Any]],
    tokenizer: Any,
    cfg: UATConfig,
    key: str,
    out_dir: Path,
    max_units: int | None,
    tracker: Progress,
    clean_loss: float,
) -> tuple[list[dict[str, Any]], bool]:
    """`(payloads, complete)`: restart r's finished unit is reused, a missing one is computed with
    `compute(r)` and written. Incomplete once `max_units` restarts were computed and more are missing.
    Each restart ends with a progress line: its loss over all optimisation texts and the increase."""
    restarts: list[dict[str, Any]] = []
    computed = 0
    n_restarts = cfg.restarts
    for r in range(n_restarts):
        check_deadline("between UAT restarts")
        payload = units.read_unit(out_dir, KIND, r, key)
        done = (r + 1) * cfg.max_sweeps
        if payload is not None:
            tracker.update(
                done,
                f"uat restart {r + 1}/{n_restarts}: reused finished unit (opt loss {payload['opt_loss']:.4f}, "
                f"{payload['opt_loss'] - clean_loss:+.4f} over clean)",
                reused=True,
                loss_increase=payload["opt_loss"] - clean_loss,
            )
        elif max_units is not None and computed >= max_units:
            return restarts, False
        else:
            payload = units.write_unit(out_dir, KIND, r, key, compute(r))
            computed += 1
            tracker.update(
                done,
                f"uat restart {r + 1}/{n_restarts}: opt loss {payload['opt_loss']:.4f} "
                f"({payload['opt_loss'] - clean_loss:+.4f} over clean {clean_loss:.4f}) after {payload['sweeps']} "
                f"sweeps{' (converged)' if payload['converged'] else ''}, trigger "
                f"{tokenizer.decode(payload['trigger_ids'])!r}",
                loss_increase=payload["opt_loss"] - clean_loss,
            )
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
    log: logging.Logger | logging.LoggerAdapter | None = None,
    max_units: int | None = None,
    bf16: Bf16 = "auto",
    on_log: OnLog | None = None,
) -> dict[str, Any]:
    """Learn a universal trigger on `opt_texts` and report its effect on `eval_texts`.

    Texts are token ids, cut to `cfg.text_max_tokens`; at most `cfg.n_opt_texts` /
    `cfg.n_eval_texts` are used. `allowed` (bool over embedding rows) defaults to
    `allowed_token_mask(tokenizer, rows)`, narrowed by the threat model (`typeable`). Writes
    `units/uat-<r>.json` per restart, then `triggers.json` and `uat_results.json` (schemas in
    SCHEMA.md) and returns the results.
    `max_units` stops after computing that many new restarts (returns `{"complete": False}`),
    which is how tests simulate a run killed part-way. `bf16` is the autocast setting
    (`runtime.bf16_enabled`: on CUDA only). Every sweep and restart is a log line with the loss
    increase so far and the time left, and a progress event for `on_log` (`monolm.core.progress`).
    """
    log = log or default_log
    out_dir = Path(out_dir)
    vocabulary = functools.partial(trigger_vocabulary, model, tokenizer, cfg, allowed, "attacks.uat")
    run = TriggerRun.of(model, tokenizer, opt_texts, eval_texts, cfg, bf16, vocabulary)
    setup = run.setup
    with attack_mode(model):
        key = run_key(model, run.opt, cfg, seed=seed, prefix=setup.prefix, allowed=run.allowed)
        clean_opt = clean_losses(setup, run.opt_batch)
        clean_loss = sum(clean_opt) / len(clean_opt)
        tracker = Progress(cfg.restarts * cfg.max_sweeps, log=log, on_log=on_log, what="uat")
        keep = roundtrip_filter(tokenizer, cfg)
        compute = functools.partial(
            _restart, setup, run.opt_batch, cfg, run.allowed, seed, progress, tracker, clean_loss, keep
        )
        restarts, complete = _restart_units(compute, tokenizer, cfg, key, out_dir, max_units, tracker, clean_loss)
        if not complete:
            return {"complete": False, "units_done": len(restarts)}
        best, evaluation, reps = _best_on_held_out(setup, restarts, run.ev_batch, success_threshold, seed)
    triggers = _triggers_record(tokenizer, cfg, setup.prefix, restarts, best)
    results = _results(run, cfg, seed, key, success_threshold, clean_loss, best, triggers, evaluation)
    results.update(_replicates(restarts, reps))
    atomic_write_json(out_dir / "triggers.json", triggers)
    atomic_write_json(out_dir / "uat_results.json", results)
    _log_effect(log, results["eval"])
    return results


def _best_on_held_out(
    setup: AttackSetup, restarts: list[dict[str, Any]], texts: TextBatch, threshold: float, seed: int
) -> tuple[dict[str, Any], dict[str, list[float]], dict[str, Any]]:
    """The best restart (highest loss over all optimisation texts; the first on a tie), its
    trigger's per-text clean and attacked losses on the held-out texts, and every restart's
    effect there (`replicates.restart_effects`)."""
    best = max(restarts, key=lambda u: (u["opt_loss"], -u["restart"]))
    evaluation = _clean_and_attacked(setup, best["trigger_ids"], texts)
    reps = restart_effects(
        setup, [u["trigger_ids"] for u in restarts], texts, evaluation["clean"], threshold=threshold, seed=seed
    )
    return best, evaluation, reps


def _results(run: TriggerRun, cfg: UATConfig, seed, key, success_threshold, clean_loss, best, triggers, evaluation):
    """`uat_results.json` up to the best trigger's effect (`run` adds the restarts as replicates)."""
    return {
        "attack": "uat",
        "complete": True,
        "seed": seed,
        "config": cfg.model_dump(mode="json"),
        "success_threshold": success_threshold,
        "run_key": key,
        "prefix_ids": run.setup.prefix,
        "n_opt_texts": len(run.opt),
        "n_eval_texts": len(run.ev),
        "n_allowed_tokens": int(run.allowed.sum()),
        "best_restart": best["restart"],
        "trigger_ids": best["trigger_ids"],
        "trigger_text": triggers["best"]["trigger_text"],
        "opt": {"clean_loss": clean_loss, "attacked_loss": best["opt_loss"]},
        **_effects(evaluation, success_threshold, seed),
    }


def _effects(evaluation: dict[str, list[float]], success_threshold: float, seed: int) -> dict[str, Any]:
    """The best trigger's effect on the evaluation texts, summarised and per text."""
    clean, attacked = evaluation["clean"], evaluation["attacked"]
    return {
        "eval": effect_summary(clean, attacked, threshold=success_threshold, seed=seed),
        "per_text": {**evaluation, **per_text_effects(clean, attacked, success_threshold)},
    }


def _replicates(restarts: list[dict[str, Any]], reps: dict[str, Any]) -> dict[str, Any]:
    """Every restart's effect on the evaluation texts, the mean over restarts, and the budget
    curves (best loss after each position step) with their saturation (`monolm.attacks.curves`)."""
    curve_list = [curves.uat_curve(u["steps"]) for u in restarts]
    return {
        "restarts": [
            {"restart": u["restart"], "trigger_ids": u["trigger_ids"], "opt_loss": u["opt_loss"], **rep}
            for u, rep in zip(restarts, reps["per_restart"], strict=True)
        ],
        "mean_over_restarts": reps["mean_over_restarts"],
        "curves": curve_list,
        "saturation": curves.saturation(curve_list),
    }


def _triggers_record(
    tokenizer: Any, cfg: UATConfig, prefix: Sequence[int], restarts: list[dict[str, Any]], best: dict[str, Any]
) -> dict[str, Any]:
    """`triggers.json`: every restart's initial and final trigger, and the best one."""
    return {
        "prefix_ids": prefix,
        "trigger_len": cfg.trigger_len,
        "restarts": [
            {
                "restart": u["restart"],
                "initial_trigger_ids": u["initial_trigger_ids"],
                "trigger_ids": u["trigger_ids"],
                "trigger_text": tokenizer.decode(u["trigger_ids"]),
                "opt_loss": u["opt_loss"],
                "sweeps": u["sweeps"],
                "converged": u["converged"],
            }
            for u in restarts
        ],
        "best": {
            "restart": best["restart"],
            "trigger_ids": best["trigger_ids"],
            "trigger_text": tokenizer.decode(best["trigger_ids"]),
            "opt_loss": best["opt_loss"],
        },
    }


def _log_effect(log: logging.Logger, e: dict[str, Any]) -> None:
    log.info(
        "uat on %d held-out texts: clean %.4f -> attacked %.4f nats/token (+%.4f, %+.1f%%), success %.0f%%",
        e["n_texts"],
        e["clean_loss"]["mean"],
        e["attacked_loss"]["mean"],
        e["abs_increase"]["mean"],
        100 * e["rel_increase"]["mean"],
        100 * e["success_rate"]["rate"],
    )
