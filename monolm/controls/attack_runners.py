"""How the damage-matched arm and the quality ladder's rungs are attacked: one runner per attack
stage of the registry, each calling the attack's library function exactly as the attack stage
calls it for an arm (same settings, texts, seed, threshold, precision), and returning the
normalized summary plus the per-text clean and attacked losses (paired with the arms'
`per_example.json` by stage 7).

An attack added to the registry without a runner here is listed by the damage stage as not
attacked, never silently dropped.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monolm.config import ExperimentConfig

Runner = Callable[..., dict[str, Any]]


def _call(module, cfg: ExperimentConfig, settings, model, tokenizer, *, seed, out_dir: Path, **kw) -> dict:
    """The attack `module`'s `run` on `model` with the arms' success threshold and precision."""
    return module.run(
        model,
        tokenizer=tokenizer,
        cfg=settings,
        seed=seed,
        out_dir=out_dir,
        success_threshold=cfg.attacks.success_threshold,
        bf16=cfg.attacks.bf16,
        **kw,
    )


def _trigger(attack: str, fixed: dict[str, Any], cfg, settings, model, tokenizer, opt, held_out, **kw) -> dict:
    """A universal trigger (UAT; GCG without its random control, which checks the attack's
    strength on the arms, while the damage arm and the rungs need the attack's effect only),
    optimised on the optimisation texts and reported on the held-out ones. The per-text losses
    are the best restart's, as the arms' `per_example.json` pairs them."""
    from monolm.attacks import gcg, uat  # imported by name: the stages' code digests follow imports
    from monolm.attacks.stage import normalize

    module = {"uat": uat, "gcg": gcg}[attack]
    result = _call(module, cfg, settings, model, tokenizer, opt_texts=opt, eval_texts=held_out, **fixed, **kw)
    per_text = result["per_text"]
    return {"summary": normalize(result["eval"]), "clean": per_text["clean"], "attacked": per_text["attacked"]}


def _hotflip(cfg: ExperimentConfig, settings, model, tokenizer, opt, held_out, *, out_dir: Path, **kw) -> dict:
    """HotFlip on the held-out texts, without the random control (the arms' attack-strength check)."""
    from monolm.attacks import hotflip
    from monolm.attacks.stage import _read_examples, normalize

    result = _call(hotflip, cfg, settings, model, tokenizer, texts=held_out, out_dir=out_dir, control=False, **kw)
    rows = _read_examples(out_dir / "hotflip_examples.jsonl")
    return {
        "summary": normalize(result["gradient"]),
        "clean": [r["clean_loss"] for r in rows],
        "attacked": [r["attacked_loss"] for r in rows],
    }


RUNNERS: dict[str, Runner] = {
    "uat": functools.partial(_trigger, "uat", {}),
    "hotflip": _hotflip,
    "gcg": functools.partial(_trigger, "gcg", {"control": False}),
}
