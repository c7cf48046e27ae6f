"""Stages 5 (UAT) and 6 (HotFlip): attack both trained arms of a seed, then transfer.

Texts come from the held-out attack split: the first `uat.n_opt_texts` optimise the UAT trigger,
the following ones are where every effect is reported (UAT evaluation and HotFlip use the same
held-out texts, in the same order for both models, so per-example paired tests are valid).
Each attack is resumable: finished units (a UAT restart, a HotFlip block) are reused on a re-run.

Besides the attack's own files, each stage writes a normalized summary that stage 7 reads:
metrics["per_model"][arm] = {clean_loss, attacked_loss, abs_increase, abs_increase_ci,
rel_increase, rel_increase_ci, success_rate, success_rate_ci, n}, metrics["transfer"]
[source][target] = abs_increase, and `per_example.json` {arm: {clean: [...], attacked: [...]}}
(HotFlip adds each arm's random control on the same texts, {arm: {..., control: {clean, attacked}}},
for the paired gradient-vs-control test). For the report to show what the attacks did: UAT's
metrics["triggers"][arm] (text) and metrics["trigger_ids"][arm], HotFlip's metrics["examples"][arm]
(the first few texts before and after, flipped tokens marked ⟦…⟧).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from monolm.config import ExperimentConfig
from monolm.core.artifacts import atomic_write_json, read_json
from monolm.core.progress import labelled, part_callback
from monolm.core.runtime import pick_device
from monolm.data import splits as data_lib
from monolm.data.stage import load_setup, model_dir
from monolm.memory import plans as planning
from monolm.models import loading as models_lib
from monolm.study.frame import Inputs, OnLog, StageRef, existing, files_under, finish, prepare, read_output
from monolm.study.layout import CellPaths
from monolm.study.registry import ATTACK_SPECS, TRAIN_STAGES, attack_text_budget

ARMS = tuple(TRAIN_STAGES)
attack_log = logging.getLogger("monolm.attacks")


def attack_texts(cfg: ExperimentConfig, tokenizer, texts: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """(optimisation texts, held-out report texts) as token ids, disjoint. Texts whose attacked
    prefix (the shorter of the two attacks' truncations) repeats an earlier one are dropped, so no
    optimisation text reappears among the report texts after truncation."""
    cut = min(getattr(a.section(cfg), a.text_tokens) for a in ATTACK_SPECS.values())
    seen: set[tuple[int, ...]] = set()
    ids = []
    for doc in data_lib.tokenize(tokenizer, texts):
        if tuple(doc[:cut]) not in seen:
            seen.add(tuple(doc[:cut]))
            ids.append(doc)
    n_opt, needed, fields = attack_text_budget(cfg)
    opt, held_out = ids[:n_opt], ids[n_opt:]
    if len(opt) < n_opt or len(held_out) < needed:
        raise ValueError(
            f"only {len(texts)} attack texts; need {n_opt} for optimisation plus {needed} held-out texts "
            f"({fields}; lower the counts or raise data.n_attack_docs)"
        )
    return opt, held_out


def _ci(summary: dict[str, Any]) -> list[float | None]:
    return [summary.get("ci_low"), summary.get("ci_high")]


def normalize(effect: dict[str, Any]) -> dict[str, Any]:
    """An attacks.effects.effect_summary as the flat per-model record stage 7 reads."""
    return {
        "clean_loss": effect["clean_loss"]["mean"],
        "attacked_loss": effect["attacked_loss"]["mean"],
        "abs_increase": effect["abs_increase"]["mean"],
        "abs_increase_ci": _ci(effect["abs_increase"]),
        "rel_increase": effect["rel_increase"]["mean"],
        "rel_increase_ci": _ci(effect["rel_increase"]),
        "success_rate": effect["success_rate"]["rate"],
        "success_rate_ci": _ci(effect["success_rate"]),
        "n": effect["n_texts"],
    }


def _models(inputs: Inputs, arms: tuple[str, ...], device) -> dict[str, Any]:
    """The trained arms named, loaded on the device."""
    return {arm: models_lib.load_model(Path(inputs[TRAIN_STAGES[arm]].metrics["model_dir"]), device) for arm in arms}


def _open_stage(cfg: ExperimentConfig, cell: CellPaths, stage: str, inputs: Inputs):
    """The stage folder (not fresh: finished units are reused), the tokenizer and the
    (optimisation, held-out) attack texts."""
    out = prepare(cfg, cell, stage, inputs)
    tokenizer, splits = load_setup(inputs["setup"])
    return out, tokenizer, attack_texts(cfg, tokenizer, splits.attack)


def _share(inputs: Inputs, stage: str) -> StageRef | None:
    """The baseline's share of `stage` (a model-scope stage) when this is a cell's stage."""
    return inputs.get(f"{stage}_baseline")


def _transfer_means(transfer: dict[str, Any]) -> dict[str, dict[str, float]]:
    return {
        src: {dst: cell["abs_increase"]["mean"] for dst, cell in row.items()} for src, row in transfer["cells"].items()
    }


def _outputs(out: Path, files: list[str], arms: tuple[str, ...]) -> list[str]:
    """The stage's own files plus each arm's it attacked, without the resumable units (work in progress)."""
    return files + [p for arm in arms for p in files_under(out, arm) if "/units/" not in p]


def _attack_arms(attack, models: dict[str, Any], out: Path, on_log: OnLog | None, **kwargs: Any) -> dict[str, Any]:
    """`attack.run` on each arm (its units under `out/<arm>/`), progress reported per arm."""
    return {
        arm: attack.run(
            model,
            out_dir=out / arm,
            on_log=part_callback(on_log, i, len(models), arm),
            log=labelled(attack_log, arm),
            **kwargs,
        )
        for i, (arm, model) in enumerate(models.items())
    }


def run_uat_baseline(
    cfg: ExperimentConfig, cell: CellPaths, inputs: Inputs, *, progress: bool = True, on_log: OnLog | None = None
) -> StageRef:
    """Stage 5's share that does not depend on the constraint: the baseline's universal trigger,
    once per (model, seed) for every cell of the grid."""
    return run_uat(cfg, cell, inputs, progress=progress, on_log=on_log, stage="uat_baseline")


def run_uat(
    cfg: ExperimentConfig,
    cell: CellPaths,
    inputs: Inputs,
    *,
    progress: bool = True,
    on_log: OnLog | None = None,
    stage: str = "uat",
) -> StageRef:
    """Stage 5: a universal trigger per arm, reported on held-out texts, and its transfer. A
    cell's stage attacks its constrained arm and takes the baseline's results from the shared
    `uat_baseline` stage; the baseline's share attacks the baseline alone."""
    from monolm.attacks import uat
    from monolm.attacks.scoring import context_prefix

    done = existing(cfg, cell, stage, inputs)
    if done:
        return done
    started = time.time()
    share = _share(inputs, "uat")
    arms = ("monotonic",) if share is not None else ("baseline",)
    # Before the arms are moved to the device: the candidate batch that fits.
    uat_cfg, memory_plan = planning.plan_attack_stage(cfg, "uat", model_dir(inputs["setup"]), pick_device(), name=stage)
    out, tokenizer, (opt, held_out) = _open_stage(cfg, cell, stage, inputs)
    models = _models(inputs, arms, pick_device())
    results = _attack_arms(
        uat,
        models,
        out,
        on_log,
        tokenizer=tokenizer,
        opt_texts=opt,
        eval_texts=held_out,
        cfg=uat_cfg,
        seed=cell.seed,
        success_threshold=cfg.attacks.success_threshold,
        bf16=cfg.attacks.bf16,
        progress=progress,
    )
    files = ["uat_results.json"]
    if share is not None:  # the cell: both arms, their transfer, and what stage 7 reads
        results = {"baseline": read_output(share, "uat_results.json")["baseline"], **results}
        models = {**_models(inputs, ("baseline",), pick_device()), **models}
        transfer = uat.transfer_matrix(
            models,
            {arm: r["trigger_ids"] for arm, r in results.items()},
            held_out[: cfg.attacks.uat.n_eval_texts],
            prefix=context_prefix(tokenizer),
            seed=cell.seed,
            success_threshold=cfg.attacks.success_threshold,
            text_max_tokens=cfg.attacks.uat.text_max_tokens,
            bf16=cfg.attacks.bf16,
        )
        _write_uat_report(out, results, transfer)
        files += ["triggers.json", "transfer.json", "per_example.json"]
    atomic_write_json(out / "uat_results.json", results)
    metrics = {
        "per_model": {arm: normalize(r["eval"]) for arm, r in results.items()},
        "triggers": {arm: r["trigger_text"] for arm, r in results.items()},
        "trigger_ids": {arm: r["trigger_ids"] for arm, r in results.items()},
        # restarts as replicates, and the budget curves (`monolm.attacks.replicates`, `curves`)
        "restart_mean": {arm: normalize(r["mean_over_restarts"]["eval"]) for arm, r in results.items()},
        "curves": {arm: {"attack": r["curves"]} for arm, r in results.items()},
        "memory_plan": memory_plan.to_json(),
    }
    if share is not None:
        metrics["transfer"] = _transfer_means(read_json(out / "transfer.json"))
    return finish(cfg, cell, stage, inputs=inputs, outputs=_outputs(out, files, arms), metrics=metrics, started=started)


def _write_uat_report(out: Path, results: dict[str, Any], transfer: dict[str, Any]) -> None:
    atomic_write_json(
        out / "triggers.json",
        {arm: {"trigger_ids": r["trigger_ids"], "trigger_text": r["trigger_text"]} for arm, r in results.items()},
    )
    atomic_write_json(out / "transfer.json", transfer)
    atomic_write_json(
        out / "per_example.json",
        {
            arm: {
                "clean": r["per_text"]["clean"],
                "attacked": r["per_text"]["attacked"],
                "restart_mean": {"clean": r["per_text"]["clean"], "attacked": r["mean_over_restarts"]["attacked"]},
            }
            for arm, r in results.items()
        },
    )


def _read_examples(path: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["index"])


REPORTED_EXAMPLES = 3  # HotFlip examples per arm shown in the report (the first texts, the same for both arms)
MARK = ("⟦", "⟧")  # around a flipped token in the report's before/after texts


def flip_example(tokenizer: Any, record: dict[str, Any]) -> dict[str, Any]:
    """One HotFlip example in words: the text before and after, each flipped token marked."""
    old = dict(zip(record["positions"], record["original_ids"], strict=True))
    new = dict(zip(record["positions"], record["new_ids"], strict=True))

    def text(replace: dict[int, int]) -> str:
        pieces = []
        for i, tok in enumerate(record["text_ids"]):
            piece = tokenizer.decode([replace.get(i, tok)])
            pieces.append(f"{MARK[0]}{piece}{MARK[1]}" if i in replace else piece)
        return "".join(pieces)

    return {
        "index": record["index"],
        "before": text(old),
        "after": text(new),
        "flips": record["flips_used"],
        "abs_increase": record["abs_increase"],
        "rel_increase": record["rel_increase"],
    }


def _per_example(arm_dirs: dict[str, Path], examples: dict[str, list[dict[str, Any]]], with_control: bool) -> dict:
    """`per_example.json`: each arm's per-text losses, and its random control's on the same texts."""
    from monolm.attacks.hotflip import EXAMPLE_FILES

    table: dict[str, Any] = {}
    for arm, rows in examples.items():
        table[arm] = {"clean": [r["clean_loss"] for r in rows], "attacked": [r["attacked_loss"] for r in rows]}
        control = arm_dirs[arm] / EXAMPLE_FILES["control"]
        if with_control and control.is_file():
            ctrl = _read_examples(control)
            if [r["index"] for r in ctrl] == [r["index"] for r in rows]:  # the same texts, in order
                table[arm]["control"] = {
                    "clean": [r["clean_loss"] for r in ctrl],
                    "attacked": [r["attacked_loss"] for r in ctrl],
                }
    return table


def run_hotflip_baseline(
    cfg: ExperimentConfig, cell: CellPaths, inputs: Inputs, *, progress: bool = True, on_log: OnLog | None = None
) -> StageRef:
    """Stage 6's share that does not depend on the constraint: HotFlip on the baseline, once per
    (model, seed) for every cell of the grid."""
    return run_hotflip(cfg, cell, inputs, progress=progress, on_log=on_log, stage="hotflip_baseline")


def run_hotflip(
    cfg: ExperimentConfig,
    cell: CellPaths,
    inputs: Inputs,
    *,
    progress: bool = True,
    on_log: OnLog | None = None,
    stage: str = "hotflip",
) -> StageRef:
    """Stage 6: greedy first-order token flips per held-out text and arm, and their transfer. A
    cell's stage attacks its constrained arm and takes the baseline's results from the shared
    `hotflip_baseline` stage; the baseline's share attacks the baseline alone."""
    from monolm.attacks import hotflip

    done = existing(cfg, cell, stage, inputs)
    if done:
        return done
    started = time.time()
    share = _share(inputs, "hotflip")
    arms = ("monotonic",) if share is not None else ("baseline",)
    hotflip_cfg, memory_plan = planning.plan_attack_stage(
        cfg, "hotflip", model_dir(inputs["setup"]), pick_device(), name=stage
    )
    out, tokenizer, (_, held_out) = _open_stage(cfg, cell, stage, inputs)
    models = _models(inputs, arms, pick_device())
    results = _attack_arms(
        hotflip,
        models,
        out,
        on_log,
        tokenizer=tokenizer,
        texts=held_out,
        cfg=hotflip_cfg,
        seed=cell.seed,
        success_threshold=cfg.attacks.success_threshold,
        bf16=cfg.attacks.bf16,
        progress=progress,
    )
    arm_dirs = {arm: out / arm for arm in arms}
    files = ["hotflip_results.json"]
    if share is not None:  # the cell: both arms, their transfer, and what stage 7 reads
        results = {"baseline": read_output(share, "hotflip_results.json")["baseline"], **results}
        arm_dirs = {"baseline": share.path / "baseline", **arm_dirs}
        models = {**_models(inputs, ("baseline",), pick_device()), **models}
        files += _write_hotflip_report(cfg, cell.seed, out, tokenizer, models, arm_dirs)
    atomic_write_json(out / "hotflip_results.json", results)
    with_control = cfg.attacks.hotflip.random_control
    examples = {arm: _read_examples(arm_dirs[arm] / "hotflip_examples.jsonl") for arm in results}
    metrics = {
        "per_model": {arm: normalize(r["gradient"]) for arm, r in results.items()},
        "control": {arm: normalize(r["control"]) for arm, r in results.items()} if with_control else None,
        "mean_flips": {arm: r["gradient"]["mean_flips"] for arm, r in results.items()},
        "examples": {
            arm: [flip_example(tokenizer, r) for r in rows[:REPORTED_EXAMPLES]] for arm, rows in examples.items()
        },
        "memory_plan": memory_plan.to_json(),
    }
    if share is not None:
        metrics["transfer"] = _transfer_means(read_json(out / "transfer.json"))
    return finish(cfg, cell, stage, inputs=inputs, outputs=_outputs(out, files, arms), metrics=metrics, started=started)


def _write_hotflip_report(cfg, seed, out, tokenizer, models, arm_dirs) -> list[str]:
    """A cell's HotFlip files over both arms: the transfer matrix (each arm's flips replayed on
    the other) and `per_example.json`. Returns their names."""
    from monolm.attacks import hotflip
    from monolm.attacks.scoring import context_prefix

    examples = {arm: _read_examples(arm_dirs[arm] / "hotflip_examples.jsonl") for arm in ARMS}
    transfer = hotflip.transfer_matrix(
        models,
        examples,
        prefix=context_prefix(tokenizer),
        seed=seed,
        success_threshold=cfg.attacks.success_threshold,
        bf16=cfg.attacks.bf16,
    )
    atomic_write_json(out / "transfer.json", transfer)
    atomic_write_json(out / "per_example.json", _per_example(arm_dirs, examples, cfg.attacks.hotflip.random_control))
    return ["transfer.json", "per_example.json"]
