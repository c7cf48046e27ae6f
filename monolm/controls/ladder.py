"""The quality ladder's stage: every rung (and the base model) evaluated on the test part and
attacked with the arms' attacks, texts and seed, once per (model, seed).

Why: a constrained model that is worse at its job is often less sensitive to an attack only
because it models text less sharply. The ladder's models trace how the loss increase under each
attack varies with clean quality among models that differ only in how far they were trained;
stage 7 compares each arm with that trend (`monolm.report.robustness`).

The stage is a model's shared work (scope `model` in `monolm.study.registry`): every variant and
init of a grid reuses it. Each rung's attacks keep their resumable units under `<rung>/<attack>/`.
With `controls.ladder.enabled: false` it writes an empty ladder.json and loads no model.

ladder.json: {"enabled", "rungs": [{"name", "source" (relative to paths.runs_root when inside it),
"evaluation": {loss, token_perplexity, tokens, per_doc}, "attacks": {attack: {"clean": [...],
"attacked": [...]}}}], "not_attacked"}.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

from monolm.config import ExperimentConfig
from monolm.config.controls import climbs
from monolm.controls.rungs import resolve_rungs
from monolm.core.artifacts import atomic_write_json
from monolm.core.progress import Progress, labelled
from monolm.core.runtime import pick_device
from monolm.data import splits as data_lib
from monolm.data.stage import load_setup, model_dir
from monolm.study.frame import Inputs, OnLog, StageRef, files_under, framed
from monolm.study.layout import CellPaths
from monolm.study.registry import ATTACKS

STAGE = "ladder"
LADDER_ATTACKS = ("uat", "hotflip", "gcg")  # the attacks a rung is attacked with (each has a runner in attack_runners)
log = logging.getLogger("monolm.stages")


def run(
    cfg: ExperimentConfig, cell: CellPaths, inputs: Inputs, *, progress: bool = True, on_log: OnLog | None = None
) -> StageRef:
    """The ladder of `cell`'s model and seed (inputs: `setup`)."""
    return framed(cfg, cell, STAGE, inputs, partial(_ladder, cfg, cell, inputs, progress=progress, on_log=on_log))


def _ladder(cfg: ExperimentConfig, cell: CellPaths, inputs: Inputs, out: Path, *, progress: bool, on_log):
    """ladder.json (and each rung's attack files) in `out`; the stage's outputs and metrics."""
    report: dict[str, Any] = {"enabled": False, "rungs": [], "not_attacked": []}
    if climbs(cfg.controls.ladder, cfg.model.source):
        report = _climb(cfg, cell, inputs["setup"], out, progress=progress, on_log=on_log)
    atomic_write_json(out / "ladder.json", report)
    outputs = ["ladder.json"] + [p for p in files_under(out, ".") if "/units/" not in p and p != "ladder.json"]
    outputs = [p for p in outputs if not p.startswith(".")]
    metrics = {
        "enabled": report["enabled"],
        "rungs": {r["name"]: {"loss": r["evaluation"]["loss"], **_increases(r)} for r in report["rungs"]},
    }
    return outputs, metrics


def _source(cfg: ExperimentConfig, path: Path) -> str:
    """Where a rung's weights came from, without the runs folder's own location: a snapshot kept
    by stage 0 is named relative to `paths.runs_root`, so ladder.json is the same bytes whichever
    folder (or resumed run) produced it, as every stage's outputs are."""
    root = Path(cfg.paths.runs_root).resolve()
    resolved = Path(path).resolve()
    if resolved.is_relative_to(root):
        return f"<paths.runs_root>/{resolved.relative_to(root).as_posix()}"
    return str(path)


def _increases(rung: dict[str, Any]) -> dict[str, float]:
    """A rung's mean loss increase per attack, for the manifest's metrics."""
    out = {}
    for attack, rec in rung["attacks"].items():
        pairs = list(zip(rec["clean"], rec["attacked"], strict=True))
        out[f"{attack}_abs_increase"] = sum(a - c for c, a in pairs) / max(len(pairs), 1)
    return out


def _climb(cfg: ExperimentConfig, cell: CellPaths, setup: StageRef, out: Path, *, progress: bool, on_log):
    """Evaluate and attack every rung, one model on the device at a time."""
    from monolm.attacks.stage import attack_texts
    from monolm.models import loading as models

    device = pick_device()
    tokenizer, splits = load_setup(setup)
    test_texts = splits.test[: cfg.evaluation.max_docs]
    docs = data_lib.tokenize(tokenizer, test_texts)
    texts = attack_texts(cfg, tokenizer, splits.attack)
    settings = _settings(cfg, model_dir(setup), device)
    rungs = resolve_rungs(cfg, setup)
    tracker = Progress(len(rungs), log=log, on_log=on_log, what="ladder")
    records = []
    for i, rung in enumerate(rungs):
        model = models.load_model(rung.path, device)
        record = {"name": rung.name, "source": _source(cfg, rung.path)}
        record["evaluation"] = _evaluate(cfg, model, docs, test_texts, tokenizer, settings["eval_batch"], device)
        record["attacks"] = {
            attack: _attack(attack, cfg, model, tokenizer, texts, settings[attack], out / rung.name / attack, cell.seed)
            for attack in LADDER_ATTACKS
        }
        del model
        records.append(record)
        tracker.update(i + 1, f"ladder {rung.name}: clean loss {record['evaluation']['loss']:.3f}")
    return {
        "enabled": True,
        "rungs": records,
        "not_attacked": [a for a in ATTACKS if a not in LADDER_ATTACKS],  # an attack without a ladder runner
    }


def _settings(cfg: ExperimentConfig, base: Path, device) -> dict[str, Any]:
    """The evaluation batch and each attack's settings with the candidate batch that fits, as the
    arms' stages choose them."""
    from monolm.memory import plans as planning

    settings: dict[str, Any] = {"eval_batch": planning.plan_eval_stage(cfg, base, device, name=STAGE).chosen}
    for attack in LADDER_ATTACKS:
        settings[attack] = planning.plan_attack_stage(cfg, attack, base, device, name=f"{STAGE} ({attack})")[0]
    return settings


def _evaluate(cfg, model, docs, texts, tokenizer, batch_size, device) -> dict[str, Any]:
    """Test-part perplexity exactly as stage 4 computes it, with per-document losses."""
    from monolm.evaluation.held_out import perplexity_on_test

    return perplexity_on_test(cfg, model, tokenizer, docs, texts, batch_size=batch_size, device=device, progress=False)


def _attack(attack: str, cfg, model, tokenizer, texts, settings, out: Path, seed: int) -> dict[str, list[float]]:
    """`attack` on a rung as its stage runs it on an arm (the damage arm's runner: UAT's trigger
    reported on the held-out texts, HotFlip and GCG without their random control, as the ladder
    needs the attack's effect only): the per-text losses the arms' `per_example.json` pairs."""
    from monolm.controls.attack_runners import RUNNERS

    opt, held_out = texts
    result = RUNNERS[attack](
        cfg,
        settings,
        model,
        tokenizer,
        opt,
        held_out,
        seed=seed,
        out_dir=out,
        progress=False,
        log=labelled(logging.getLogger("monolm.attacks"), f"ladder {out.parent.name}"),
    )
    return {"clean": result["clean"], "attacked": result["attacked"]}
