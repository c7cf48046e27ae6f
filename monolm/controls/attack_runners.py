"""How the damage-matched arm is attacked: one runner per attack stage of the registry, each
calling the attack's library function exactly as the attack stage calls it for an arm (same
settings, texts, seed, threshold, precision), and returning the normalized summary plus the
per-text clean and attacked losses (paired with the arms' `per_example.json` by stage 7).

An attack added to the registry without a runner here is listed by the damage stage as not
attacked, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from monolm.config import ExperimentConfig

Runner = Callable[..., dict[str, Any]]


def _uat(cfg: ExperimentConfig, uat_cfg, model, tokenizer, opt, held_out, *, seed, out_dir: Path, **kw) -> dict:
    from monolm.attacks import uat
    from monolm.attacks.stage import normalize

    result = uat.run(
        model,
        tokenizer=tokenizer,
        opt_texts=opt,
        eval_texts=held_out,
        cfg=uat_cfg,
        seed=seed,
        out_dir=out_dir,
        success_threshold=cfg.attacks.success_threshold,
        bf16=cfg.attacks.bf16,
        **kw,
    )
    per_text = result["per_text"]
    return {"summary": normalize(result["eval"]), "clean": per_text["clean"], "attacked": per_text["attacked"]}


def _hotflip(cfg: ExperimentConfig, hotflip_cfg, model, tokenizer, opt, held_out, *, seed, out_dir: Path, **kw) -> dict:
    from monolm.attacks import hotflip
    from monolm.attacks.stage import _read_examples, normalize

    result = hotflip.run(
        model,
        tokenizer=tokenizer,
        texts=held_out,
        cfg=hotflip_cfg,
        seed=seed,
        out_dir=out_dir,
        success_threshold=cfg.attacks.success_threshold,
        bf16=cfg.attacks.bf16,
        control=False,  # the random control is the arms' attack-strength check, not needed here
        **kw,
    )
    rows = _read_examples(out_dir / "hotflip_examples.jsonl")
    return {
        "summary": normalize(result["gradient"]),
        "clean": [r["clean_loss"] for r in rows],
        "attacked": [r["attacked_loss"] for r in rows],
    }


def _gcg(cfg: ExperimentConfig, gcg_cfg, model, tokenizer, opt, held_out, *, seed, out_dir: Path, **kw) -> dict:
    """GCG as the `gcg` stage runs it on an arm, without its random control (the control checks
    the attack's strength on the arms; the damage arm needs the attack's effect only). The
    per-text losses are the best restart's, as the arms' `per_example.json` pairs them."""
    from monolm.attacks import gcg
    from monolm.attacks.stage import normalize

    result = gcg.run(
        model,
        tokenizer=tokenizer,
        opt_texts=opt,
        eval_texts=held_out,
        cfg=gcg_cfg,
        seed=seed,
        out_dir=out_dir,
        success_threshold=cfg.attacks.success_threshold,
        bf16=cfg.attacks.bf16,
        control=False,
        **kw,
    )
    per_text = result["per_text"]
    return {"summary": normalize(result["eval"]), "clean": per_text["clean"], "attacked": per_text["attacked"]}


RUNNERS: dict[str, Runner] = {"uat": _uat, "hotflip": _hotflip, "gcg": _gcg}
