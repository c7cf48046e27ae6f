"""Stages 2 and 3 — train the baseline and the constrained ("monotonic") arm with one loop.

Fair by default: both arms get the same data, token budget, optimizer and schedule
(`training.common`); an asymmetric recipe is an explicit, reported setting. The baseline starts
from the base model, the monotonic arm from stage 1's constrained initialisation.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from monolm.config import ArmConfig, ExperimentConfig
from monolm.constraint.frozen import frozen_share
from monolm.core.runtime import derive_seed, pick_device
from monolm.data import splits as data_lib
from monolm.data.stage import load_setup, model_dir
from monolm.evaluation.held_out import validation_evaluator
from monolm.memory import plans as planning
from monolm.models import loading as models
from monolm.study.frame import Inputs, OnLog, StageRef, files_under, framed
from monolm.study.layout import CellPaths
from monolm.study.registry import TRAIN_STAGES

if TYPE_CHECKING:
    from monolm.training import Evaluate, SaveModel

Arm = Literal["baseline", "monotonic"]


def run_baseline(
    cfg: ExperimentConfig, cell: CellPaths, inputs: Inputs, *, progress: bool = True, on_log: OnLog | None = None
) -> StageRef:
    """Stage 2: the baseline arm, from stage 0's base model."""
    return run(cfg, cell, "baseline", inputs, progress=progress, on_log=on_log)


def run_monotonic(
    cfg: ExperimentConfig, cell: CellPaths, inputs: Inputs, *, progress: bool = True, on_log: OnLog | None = None
) -> StageRef:
    """Stage 3: the constrained arm, from stage 1's constrained initialisation."""
    return run(cfg, cell, "monotonic", inputs, progress=progress, on_log=on_log)


def run(
    cfg: ExperimentConfig,
    cell: CellPaths,
    arm: Arm,
    inputs: Inputs,
    *,
    progress: bool = True,
    on_log: OnLog | None = None,
) -> StageRef:
    if arm == "monotonic" and "constrain" not in inputs:
        raise ValueError("the monotonic arm starts from stage 1's constrained model: pass inputs['constrain']")

    # `out` is not a fresh folder: a retried stage resumes from its last valid checkpoint in it.
    def compute(out: Path) -> tuple[list[str], dict[str, Any]]:
        return _train_arm(cfg, cell, arm, inputs, out, progress=progress, on_log=on_log)

    return framed(cfg, cell, TRAIN_STAGES[arm], inputs, compute)


def _train_arm(
    cfg: ExperimentConfig, cell: CellPaths, arm: Arm, inputs: Inputs, out: Path, *, progress: bool, on_log
) -> tuple[list[str], dict[str, Any]]:
    """Train the arm in `out` (or finish an interrupted training); the stage's outputs and metrics."""
    from monolm.training import train

    setup = inputs["setup"]
    device = pick_device()
    tokenizer, splits = load_setup(setup)
    init_dir = model_dir(setup) if arm == "baseline" else Path(inputs["constrain"].metrics["model_dir"])
    # Before the model is moved to the device: micro-batch and accumulation that fit, same effective batch.
    recipe, memory_plan = planning.plan_train_stage(cfg, arm, cfg.training.arm(arm), init_dir, device)
    model = models.load_model(init_dir, device)
    blocks = data_lib.pack_blocks(data_lib.tokenize(tokenizer, splits.train), cfg.data.seq_len, tokenizer.eos_token_id)
    # Checkpoint selection sees only the validation part; stage 4 reports on the disjoint test part.
    evaluate = validation(cfg, recipe, tokenizer, splits.validation[: recipe.eval_max_docs], device)
    save = saver(cfg, arm, tokenizer)

    frozen_start = frozen_share(model) if arm == "monotonic" else None  # before any step (a resume: of the init)
    # Both arms see the same data order: the data seed does not depend on the arm.
    result = train(
        model,
        blocks,
        recipe,
        out,
        seed=derive_seed(cell.seed, "finetune"),
        evaluate=evaluate,
        constrained=(arm == "monotonic"),
        device=device,
        progress=progress,
        save_model=save,
        on_log=on_log,
    )
    metrics = {
        "arm": arm,
        "recipe": cfg.training.recipe,
        "lr": recipe.lr,
        "steps": result.steps,
        "tokens_seen": result.tokens_seen,
        "effective_batch_size": result.effective_batch_size,
        "final": result.final_metrics,
        "validation_docs": min(len(splits.validation), recipe.eval_max_docs),
        "model_dir": str((out / "best").resolve()),
        "memory_plan": memory_plan.to_json(),
    }
    if frozen_start is not None:  # constrained weights with dW/dV below the bound, at the start and end
        metrics["frozen"] = {"start": frozen_start, "end": frozen_share(model)}
    return ["history.json", *files_under(out, "best")], metrics


def validation(cfg: ExperimentConfig, recipe: ArmConfig, tokenizer, texts: list[str], device) -> Evaluate:
    """The held-out perplexity that picks the best checkpoint, in the arm's own precision."""
    return validation_evaluator(cfg, recipe, tokenizer, texts, device)


def saver(cfg: ExperimentConfig, arm: Arm, tokenizer) -> SaveModel:
    """How the arm's models are written: with the constraint's spec for the monotonic arm, as a
    plain Hugging Face model for the baseline."""

    def save(model, directory: Path) -> list[str]:
        if arm == "monotonic":
            from monolm.constraint.softplus import save_constrained

            save_constrained(model, tokenizer, directory, spec=cfg.constraint.model_dump(mode="json"))
            return files_under(directory, ".")
        return models.save_model(model, tokenizer, directory)

    return save
