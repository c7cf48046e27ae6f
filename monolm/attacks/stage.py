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
from collections.abc import Callable
from dataclasses import dataclass
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


def _transfer_means(transfer: dict[str, Any]) -> dict[str, dict[str, float]]:
    return {
        src: {dst: cell["abs_increase"]["mean"] for dst, cell in row.items()} for src, row in transfer["cells"].items()
    }


@dataclass
class AttackRun:
    """An attack stage under way, as the UAT, HotFlip and GCG stages share it: the arms it
    attacks (a cell's stage the constrained arm, the baseline's share the baseline), the attack's
    settings with the candidate batch that fits, the stage folder, the tokenizer, the
    (optimisation, held-out) texts and the arms' models on the device."""

    cfg: ExperimentConfig
    cell: CellPaths
    inputs: Inputs
    stage: str
    started: float
    share: StageRef | None
    arms: tuple[str, ...]
    settings: Any
    memory_plan: Any
    out: Path
    tokenizer: Any
    opt: list[list[int]]
    held_out: list[list[int]]
    models: dict[str, Any]

    @classmethod
    def open(cls, cfg: ExperimentConfig, cell: CellPaths, inputs: Inputs, stage: str, attack: str) -> AttackRun:
        """Start `attack`'s stage `stage` (the caller has checked that it is not done yet)."""
        started = time.time()
        share = inputs.get(f"{attack}_baseline")  # a cell's stage: the baseline's share of it
        arms = ("monotonic",) if share is not None else ("baseline",)
        # Before the arms are moved to the device: the candidate batch that fits.
        settings, memory_plan = planning.plan_attack_stage(
            cfg, attack, model_dir(inputs["setup"]), pick_device(), name=stage
        )
        out, tokenizer, (opt, held_out) = _open_stage(cfg, cell, stage, inputs)
        models = _models(inputs, arms, pick_device())
        return cls(
            cfg, cell, inputs, stage, started, share, arms, settings, memory_plan, out, tokenizer, opt, held_out, models
        )

    def attack(self, module: Any, on_log: OnLog | None, progress: bool, **kwargs: Any) -> dict[str, Any]:
        """`module.run` on each arm (its units under `out/<arm>/`) with the stage's settings, seed,
        threshold and precision, progress reported per arm."""
        return {
            arm: module.run(
                model,
                out_dir=self.out / arm,
                on_log=part_callback(on_log, i, len(self.models), arm),
                log=labelled(attack_log, arm),
                tokenizer=self.tokenizer,
                cfg=self.settings,
                seed=self.cell.seed,
                success_threshold=self.cfg.attacks.success_threshold,
                bf16=self.cfg.attacks.bf16,
                progress=progress,
                **kwargs,
            )
            for i, (arm, model) in enumerate(self.models.items())
        }

    def with_baseline(self, results: dict[str, Any], results_file: str) -> dict[str, Any]:
        """The results as the stage reports them: a cell's over both arms, the baseline's from its
        share first (its model is loaded too, for the transfer between the arms); the baseline's
        share's as they are."""
        if self.share is None:
            return results
        self.models = {**_models(self.inputs, ("baseline",), pick_device()), **self.models}
        return {"baseline": read_output(self.share, results_file)["baseline"], **results}

    def trigger_transfer(self, triggers: dict[str, list[int]], section: Any) -> dict[str, Any]:
        """Each arm's universal trigger on every arm's model (`uat.transfer_matrix`), on the
        held-out texts the attack reports on (`section`: its settings' text counts)."""
        from monolm.attacks import uat
        from monolm.attacks.scoring import context_prefix

        return uat.transfer_matrix(
            self.models,
            triggers,
            self.held_out[: section.n_eval_texts],
            prefix=context_prefix(self.tokenizer),
            seed=self.cell.seed,
            success_threshold=self.cfg.attacks.success_threshold,
            text_max_tokens=section.text_max_tokens,
            bf16=self.cfg.attacks.bf16,
        )

    def finish(self, files: list[str], metrics: dict[str, Any]) -> StageRef:
        """The stage's manifest; a cell's metrics add the transfer's mean increases."""
        if self.share is not None:
            metrics["transfer"] = _transfer_means(read_json(self.out / "transfer.json"))
        # the stage's own files plus each arm's it attacked, without the resumable units (work in progress)
        outputs = files + [p for arm in self.arms for p in files_under(self.out, arm) if "/units/" not in p]
        return finish(
            self.cfg, self.cell, self.stage, inputs=self.inputs, outputs=outputs, metrics=metrics, started=self.started
        )


Body = Callable[[AttackRun, OnLog | None, bool], tuple[list[str], dict[str, Any]]]


@dataclass(frozen=True)
class AttackStage:
    """An attack stage's entry (the registry's `entry`): `attack`'s stage `stage`, the baseline's
    share (`<attack>_baseline`, once per (model, seed) for every cell of the grid: the baseline
    alone) or a cell's stage (its constrained arm, the baseline's results taken from the share,
    and the transfer between the arms). A finished stage is reused; otherwise
    `body(run, on_log, progress)` attacks the arms, writes the stage's files and returns their
    names and the stage's metrics for its manifest."""

    stage: str
    attack: str
    body: Body

    def __call__(
        self,
        cfg: ExperimentConfig,
        cell: CellPaths,
        inputs: Inputs,
        *,
        progress: bool = True,
        on_log: OnLog | None = None,
    ) -> StageRef:
        done = existing(cfg, cell, self.stage, inputs)
        if done:
            return done
        run = AttackRun.open(cfg, cell, inputs, self.stage, self.attack)
        files, metrics = self.body(run, on_log, progress)
        return run.finish(files, metrics)


def _uat(run: AttackRun, on_log: OnLog | None, progress: bool) -> tuple[list[str], dict[str, Any]]:
    """Stage 5: a universal trigger per arm, reported on held-out texts, and its transfer."""
    from monolm.attacks import uat

    results = run.attack(uat, on_log, progress, opt_texts=run.opt, eval_texts=run.held_out)
    results = run.with_baseline(results, "uat_results.json")
    files = ["uat_results.json"]
    if run.share is not None:  # the cell: both arms, their transfer, and what stage 7 reads
        _write_uat_report(run, results)
        files += ["triggers.json", "transfer.json", "per_example.json"]
    atomic_write_json(run.out / "uat_results.json", results)
    return files, {
        "per_model": {arm: normalize(r["eval"]) for arm, r in results.items()},
        "triggers": {arm: r["trigger_text"] for arm, r in results.items()},
        "trigger_ids": {arm: r["trigger_ids"] for arm, r in results.items()},
        # restarts as replicates, and the budget curves (`monolm.attacks.replicates`, `curves`)
        "restart_mean": {arm: normalize(r["mean_over_restarts"]["eval"]) for arm, r in results.items()},
        "curves": {arm: {"attack": r["curves"]} for arm, r in results.items()},
        "memory_plan": run.memory_plan.to_json(),
    }


def _write_uat_report(run: AttackRun, results: dict[str, Any]) -> None:
    """A cell's UAT files over both arms: the triggers, the transfer matrix (each arm's trigger on
    the other) and `per_example.json`."""
    out = run.out
    transfer = run.trigger_transfer({arm: r["trigger_ids"] for arm, r in results.items()}, run.cfg.attacks.uat)
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


def _hotflip(run: AttackRun, on_log: OnLog | None, progress: bool) -> tuple[list[str], dict[str, Any]]:
    """Stage 6: greedy first-order token flips per held-out text and arm, and their transfer."""
    from monolm.attacks import hotflip

    cfg = run.cfg
    results = run.attack(hotflip, on_log, progress, texts=run.held_out)
    results = run.with_baseline(results, "hotflip_results.json")
    arm_dirs = {arm: run.out / arm for arm in run.arms}
    files = ["hotflip_results.json"]
    if run.share is not None:  # the cell: both arms, their transfer, and what stage 7 reads
        arm_dirs = {"baseline": run.share.path / "baseline", **arm_dirs}
        files += _write_hotflip_report(cfg, run.cell.seed, run.out, run.tokenizer, run.models, arm_dirs)
    atomic_write_json(run.out / "hotflip_results.json", results)
    with_control = cfg.attacks.hotflip.random_control
    examples = {arm: _read_examples(arm_dirs[arm] / "hotflip_examples.jsonl") for arm in results}
    return files, {
        "per_model": {arm: normalize(r["gradient"]) for arm, r in results.items()},
        "control": {arm: normalize(r["control"]) for arm, r in results.items()} if with_control else None,
        "mean_flips": {arm: r["gradient"]["mean_flips"] for arm, r in results.items()},
        "examples": {
            arm: [flip_example(run.tokenizer, r) for r in rows[:REPORTED_EXAMPLES]] for arm, rows in examples.items()
        },
        "memory_plan": run.memory_plan.to_json(),
    }


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


# The registry's entries (`monolm.study.registry`): each attack's baseline share and cell stage.
run_uat_baseline = AttackStage("uat_baseline", "uat", _uat)
run_uat = AttackStage("uat", "uat", _uat)
run_hotflip_baseline = AttackStage("hotflip_baseline", "hotflip", _hotflip)
run_hotflip = AttackStage("hotflip", "hotflip", _hotflip)
