"""Universal GCG (Zou et al. 2023, "Universal and Transferable Adversarial Attacks on Aligned
Language Models"; GraySwan's nanoGCG is the reference implementation this one follows), and its
gradient-free control.

Threat model and objective are UAT's (`monolm.attacks.uat`), so the two compare: a trigger of
`trigger_len` tokens is prepended to every text (after the one-token context prefix) and
optimised to raise the mean cross-entropy of the original text tokens (prefix and trigger
positions are never targets) over `n_opt_texts` optimisation texts; it is reported on
`n_eval_texts` disjoint held-out texts. Where UAT changes one position per step and re-scores
the top-k tokens of that position, GCG samples `search_width` candidates per step, each changing
`n_replace` random positions to random gradient-ranked tokens, and scores them all exactly
(`gcg_search` has the step). The control (`control=True`) runs the same loop with random
allowed tokens instead of gradient-ranked ones: same steps, width and scoring passes, no
gradient. If GCG does not beat it, the gradient carries no information (or is masked).

Candidate tokens and triggers follow the threat model UAT shares (`monolm.attacks.typeable`): no
special tokens or unused rows, no non-ASCII tokens unless `allow_non_ascii`, and with
`filter_ids` only candidate triggers whose decoded text encodes back to the same ids.

`restarts` restarts from triggers drawn with generators seeded by (seed, kind, restart). Every
restart is kept: its trigger, its budget curve, and its effect on every evaluation text
(`replicates`); the best restart (highest loss over all optimisation texts) is the attacker's
view, the per-text mean over restarts the average try's. Each restart is resumable after every
step (`units/<kind>part-<r>.json`) and final once done (`units/<kind>-<r>.json`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monolm.attacks import curves, units
from monolm.attacks.effects import effect_summary, per_text_effects
from monolm.attacks.gcg_search import Restart, SearchState, optimise_restart
from monolm.attacks.replicates import restart_effects
from monolm.attacks.scoring import attack_mode
from monolm.attacks.trigger_search import TriggerRun, clean_losses
from monolm.attacks.typeable import roundtrip_filter, trigger_vocabulary
from monolm.config import GCGConfig
from monolm.core.artifacts import atomic_write_json
from monolm.core.deadline import check_deadline
from monolm.core.progress import OnLog, Progress
from monolm.core.runtime import Bf16, generator

default_log = logging.getLogger("monolm.attacks")
KINDS = {False: "gcg", True: "gcg_control"}


def _restarts(base: Restart, seed: int, max_units: int | None, tracker: Progress, clean: float) -> list[dict] | None:
    """Every restart's payload (finished units reused, partial ones resumed); None when
    `max_units` restarts were computed and more are missing."""
    cfg, out = base.cfg, []
    computed = 0
    for r in range(cfg.restarts):
        check_deadline("between GCG restarts")
        payload = units.read_unit(base.out_dir, base.kind, r, base.key)
        if payload is None:
            if max_units is not None and computed >= max_units:
                return None
            run = Restart(**{**base.__dict__, "index": r})

            def on_step(state: SearchState, r: int = r) -> None:
                tracker.update(
                    r * cfg.steps + state.step,
                    f"{base.kind} restart {r + 1}/{cfg.restarts} step {state.step}/{cfg.steps}: best loss "
                    f"{state.best_loss:.4f} ({state.best_loss - clean:+.4f} over clean)",
                    loss_increase=state.best_loss - clean,
                )

            result = optimise_restart(run, generator(seed, base.kind, r), on_step)
            payload = units.write_unit(base.out_dir, base.kind, r, base.key, {"restart": r, **result})
            run.drop_partial()
            computed += 1
        out.append(payload)
    return out


def run(
    model: nn.Module,
    tokenizer: Any,
    opt_texts: Sequence[Sequence[int]],
    eval_texts: Sequence[Sequence[int]],
    cfg: GCGConfig,
    *,
    seed: int,
    out_dir: str | Path,
    control: bool = False,
    allowed: torch.Tensor | None = None,
    success_threshold: float = 0.15,
    log: logging.Logger | logging.LoggerAdapter | None = None,
    max_units: int | None = None,
    bf16: Bf16 = "auto",
    on_log: OnLog | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Learn a universal trigger with GCG (or the random control) on `opt_texts` and report it
    on `eval_texts`. Writes `units/`, then `<kind>_results.json` (see SCHEMA.md) and returns it;
    `{"complete": False}` when `max_units` stopped it (how tests simulate a kill). `progress`
    is accepted for the stage's common call and unused (every step is a log line)."""
    log = log or default_log
    kind = KINDS[control]
    out_dir = Path(out_dir)
    vocabulary = functools.partial(trigger_vocabulary, model, tokenizer, cfg, allowed, "attacks.gcg")
    run = TriggerRun.of(model, tokenizer, opt_texts, eval_texts, cfg, bf16, vocabulary)
    setup = run.setup
    with attack_mode(model):
        key = units.trigger_run_key(model, run.opt, cfg, kind=kind, seed=seed, prefix=setup.prefix, allowed=run.allowed)
        clean_opt = clean_losses(setup, run.opt_batch)
        clean_loss = sum(clean_opt) / len(clean_opt)
        keep = roundtrip_filter(tokenizer, cfg)
        base = Restart(setup, run.opt_batch, cfg, run.allowed, keep, control, out_dir, kind, 0, key)
        tracker = Progress(cfg.restarts * cfg.steps, log=log, on_log=on_log, what=kind)
        restarts = _restarts(base, seed, max_units, tracker, clean_loss)
        if restarts is None:
            return {"complete": False}
        clean = clean_losses(setup, run.ev_batch)
        reps = restart_effects(
            setup, [u["trigger_ids"] for u in restarts], run.ev_batch, clean, threshold=success_threshold, seed=seed
        )
    results = _results(tokenizer, cfg, kind, seed, key, run, clean_opt, clean, restarts, reps)
    results["success_threshold"] = success_threshold
    results["eval"] = effect_summary(clean, results["per_text"]["attacked"], threshold=success_threshold, seed=seed)
    results["per_text"].update(per_text_effects(clean, results["per_text"]["attacked"], success_threshold))
    atomic_write_json(out_dir / f"{kind}_results.json", results)
    _log_effect(log, kind, results)
    return results


def _log_effect(log: logging.Logger | logging.LoggerAdapter, kind: str, results: dict[str, Any]) -> None:
    e = results["eval"]
    log.info(
        "%s on %d held-out texts: clean %.4f -> attacked %.4f nats/token (+%.4f) best of %d; mean over restarts +%.4f",
        kind,
        e["n_texts"],
        e["clean_loss"]["mean"],
        e["attacked_loss"]["mean"],
        e["abs_increase"]["mean"],
        len(results["restarts"]),
        results["mean_over_restarts"]["eval"]["abs_increase"]["mean"],
    )


def _results(tokenizer, cfg, kind, seed, key, run: TriggerRun, clean_opt, clean, restarts, reps) -> dict:
    """The run's record (its `eval` and per-text effects are added by `run`): the best restart's
    trigger, every restart, the mean over restarts, and the budget curves with their saturation."""
    best = max(restarts, key=lambda u: (u["opt_loss"], -u["restart"]))
    attacked = reps["per_restart"][best["restart"]]["attacked"]
    curve_list = [u["curve"] for u in restarts]
    return {
        "attack": kind,
        "complete": True,
        "seed": seed,
        "config": cfg.model_dump(mode="json"),
        "run_key": key,
        "prefix_ids": list(run.setup.prefix),
        "n_opt_texts": len(run.opt),
        "n_eval_texts": len(clean),
        "n_allowed_tokens": int(run.allowed.sum()),
        "candidates_scored": sum(sum(u["scored"]) for u in restarts),
        "best_restart": best["restart"],
        "trigger_ids": best["trigger_ids"],
        "trigger_text": tokenizer.decode(best["trigger_ids"]),
        "opt": {"clean_loss": sum(clean_opt) / len(clean_opt), "attacked_loss": best["opt_loss"]},
        "per_text": {"clean": clean, "attacked": attacked},
        "restarts": [
            {
                **u,
                "trigger_text": tokenizer.decode(u["trigger_ids"]),
                "eval": rep["eval"],
                "attacked": rep["attacked"],
            }
            for u, rep in zip(restarts, reps["per_restart"], strict=True)
        ],
        "mean_over_restarts": reps["mean_over_restarts"],
        "curves": curve_list,
        "saturation": curves.saturation(curve_list),
    }
