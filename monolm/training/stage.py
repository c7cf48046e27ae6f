"""Stages 2 and 3 — train the baseline and the constrained ("monotonic") arm with one loop.

Fair by default: both arms get the same data, token budget, optimizer and schedule
(`training.common`); an asymmetric recipe is an explicit, reported setting. The baseline starts
from the base model, the monotonic arm from stage 1's constrained initialisation.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from monolm.config import ArmConfig, ExperimentConfig
from monolm.constraint.frozen import frozen_share
from monolm.core.runtime import derive_seed, pick_device
from monolm.data import splits as data_lib
from monolm.data.stage import load_setup, model_dir
from monolm.evaluation import perplexity as evaluation
from monolm.memory import plans as planning
from monolm.models import loading as models
from monolm.study.frame import Inputs, OnLog, StageRef, existing, files_under, finish, prepare
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
    from monolm.training import train

    stage = TRAIN_STAGES[arm]
    if arm == "monotonic" and "constrain" not in inputs:
        raise ValueError("the monotonic arm starts from stage 1's constrained model: pass inputs['constrain']")
    done = existing(cfg, cell, stage, inputs)
    if done:
        return done
    started = time.time()
    setup = inputs["setup"]
    # Not a fresh folder: a retried stage resumes from its last valid checkpoint in this folder.
    out = prepare(cfg, cell, stage, inputs)
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
    return finish(
        cfg,
        cell,
        stage,
        inputs=inputs,
        outputs=["history.json", *files_under(out, "best")],
        metrics=metrics,
        started=started,
    )


def validation(cfg: ExperimentConfig, recipe: ArmConfig, tokenizer, texts: list[str], device) -> Evaluate:
    """The held-out perplexity that picks the best checkpoint, in the arm's own precision."""
    docs = data_lib.tokenize(tokenizer, texts)

    def evaluate(model) -> dict:
        result = evaluation.perplexity(
            model,
            docs,
            seq_len=cfg.data.seq_len,
            batch_size=cfg.evaluation.batch_size,
            prefix_token_id=tokenizer.eos_token_id,
            device=device,
            progress=False,
            bf16=recipe.bf16,
        )
        return {"perplexity": result["token_perplexity"], "loss": result["loss"], "tokens": result["tokens"]}

    return evaluate


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
