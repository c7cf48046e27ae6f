"""The damage-matched arm as a stage (per cell and seed, after both arms are trained).

It reads the constrained arm's validation loss (re-measured here on the same validation documents
and precision the training used to pick its checkpoint), perturbs the baseline's copies of the
matrices the variant constrains until its validation loss matches (`monolm.controls.damage`),
evaluates the result on the test part and attacks it on the attack part with the arms' own attack
settings, texts and seed. Nothing is trained. Attack work is resumable (the attacks' units).

Writes `damage.json`: {"bisection", "matrices", "test": {loss, token_perplexity, per_doc},
"attacks": {attack: {summary, clean, attacked}}, "not_attacked": {attack: why}}; stage 7 reads it.
With `controls.damage.enabled: false` the stage records only that it was off.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monolm.config import ExperimentConfig
from monolm.controls.damage import constrained_matrices, damage_matrices, match_damage
from monolm.core.artifacts import atomic_write_json
from monolm.core.progress import labelled, part_callback
from monolm.core.runtime import derive_seed, pick_device
from monolm.data import splits as data_lib
from monolm.data.stage import load_setup, model_dir
from monolm.evaluation.held_out import perplexity_on_test, validation_evaluator
from monolm.memory import plans as planning
from monolm.models import loading as models
from monolm.study.frame import Inputs, OnLog, StageRef, files_under, framed
from monolm.study.layout import CellPaths
from monolm.study.registry import ATTACKS

STAGE = "damage"
RESULT_FILE = "damage.json"
log = logging.getLogger("monolm.stages")


def _val_loss(cfg: ExperimentConfig, tokenizer, texts: list[str], device) -> Callable[[Any], float]:
    """The validation loss the training's checkpoint selection used (same documents, precision)."""
    recipe = cfg.training.arm("monotonic")
    evaluate = validation_evaluator(cfg, recipe, tokenizer, texts[: recipe.eval_max_docs], device)
    return lambda model: evaluate(model)["loss"]


def _test(cfg: ExperimentConfig, model, tokenizer, texts: list[str], device, progress: bool) -> dict[str, Any]:
    texts = texts[: cfg.evaluation.max_docs]  # the documents stage 4 reports on
    docs = data_lib.tokenize(tokenizer, texts)
    batch = cfg.evaluation.batch_size
    result = perplexity_on_test(cfg, model, tokenizer, docs, texts, batch_size=batch, device=device, progress=progress)
    return {k: result[k] for k in ("loss", "token_perplexity", "tokens", "docs", "per_doc")}


def run(
    cfg: ExperimentConfig, cell: CellPaths, inputs: Inputs, *, progress: bool = True, on_log: OnLog | None = None
) -> StageRef:
    """The damage-matched arm of one cell and seed: matched, evaluated and attacked."""

    def compute(out: Path) -> tuple[list[str], dict[str, Any]]:
        if not cfg.controls.damage.enabled:
            return [], {"enabled": False}
        return _damage(cfg, cell, inputs, out, progress=progress, on_log=on_log)

    return framed(cfg, cell, STAGE, inputs, compute)


def _damage(cfg: ExperimentConfig, cell: CellPaths, inputs: Inputs, out: Path, *, progress: bool, on_log):
    """Match, save, evaluate and attack the damaged model in `out`; the stage's outputs and metrics."""
    device = pick_device()
    tokenizer, splits = load_setup(inputs["setup"])
    val_loss = _val_loss(cfg, tokenizer, splits.validation, device)
    constrained = models.load_model(Path(inputs["train_monotonic"].metrics["model_dir"]), device)
    target, constrained_names = val_loss(constrained), constrained_matrices(constrained)
    del constrained
    model = models.load_model(Path(inputs["train_baseline"].metrics["model_dir"]), device)
    names = damage_matrices(model, cfg.constraint.variant)
    if names != constrained_names:  # the control is only a control if it touches the same matrices
        raise ValueError(f"damage: the variant {cfg.constraint.variant!r} resolves to other matrices than the arm's")
    damage = cfg.controls.damage
    search = match_damage(
        model,
        names,
        val_loss,
        target,
        seed=derive_seed(cell.seed, "damage"),
        tolerance=damage.tolerance,
        max_steps=damage.max_steps,
        initial_scale=damage.initial_scale,
    )
    log.info("damage: noise scale %.4g gives validation loss %.4f (target %.4f)", search.scale, search.loss, target)
    models.save_model(model, tokenizer, out / "model")
    test = _test(cfg, model, tokenizer, splits.test, device, progress)
    attacks, skipped, plans = attack_damaged(cfg, cell, inputs, model, tokenizer, splits.attack, out, progress, on_log)
    report = {"bisection": search.to_json(), "matrices": names, "test": test, "attacks": attacks}
    atomic_write_json(out / RESULT_FILE, {**report, "not_attacked": skipped})
    metrics = {
        "enabled": True,
        "scale": search.scale,
        "val_loss": search.loss,
        "target_val_loss": target,
        "within_tolerance": search.within_tolerance,
        "bisection_steps": search.steps,
        "test_loss": test["loss"],
        "test_token_perplexity": test["token_perplexity"],
        "per_model": {name: {"damage": a["summary"]} for name, a in attacks.items()},
        "not_attacked": skipped,
        "memory_plans": plans,  # each attack's candidate batch on this device
        "model_dir": str((out / "model").resolve()),
    }
    outputs = [RESULT_FILE, *files_under(out, "model")]
    outputs += [p for name in attacks for p in files_under(out, name) if "/units/" not in p]
    return outputs, metrics


def attack_damaged(cfg, cell, inputs, model, tokenizer, attack_docs, out: Path, progress, on_log):
    """Every attack of the registry that has a runner here, on the damaged model, with the arms'
    settings, texts and seed: ({attack: {summary, clean, attacked}}, {attack without runner: why},
    {attack: its memory plan})."""
    from monolm.attacks.stage import attack_texts
    from monolm.controls.attack_runners import RUNNERS

    opt, held_out = attack_texts(cfg, tokenizer, attack_docs)
    results: dict[str, Any] = {}
    plans: dict[str, Any] = {}
    skipped = {name: "no damage-arm runner for this attack" for name in ATTACKS if name not in RUNNERS}
    todo = [name for name in ATTACKS if name in RUNNERS]
    for i, name in enumerate(todo):
        attack_cfg, plan = planning.plan_attack_stage(
            cfg, name, model_dir(inputs["setup"]), pick_device(), name=f"{STAGE} ({name})"
        )
        plans[name] = plan.to_json()
        results[name] = RUNNERS[name](
            cfg,
            attack_cfg,
            model,
            tokenizer,
            opt,
            held_out,
            seed=cell.seed,
            out_dir=out / name,
            progress=progress,
            on_log=part_callback(on_log, i, len(todo), name),
            log=labelled(logging.getLogger("monolm.attacks"), f"damage {name}"),
        )
    return results, skipped, plans
