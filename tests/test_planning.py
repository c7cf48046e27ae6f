"""The memory plan inside the stages (recorded in every GPU stage's manifest, applied to the
settings it governs), a resume across a changed micro-batch split, and `monolm plan`."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import counter_blocks, micro_config, stage_dir, tiny_neox

from monolm.config import ArmConfig
from monolm.memory import estimates as memory
from monolm.memory import plans as planning


def test_every_gpu_stage_records_its_plan(tmp_path):
    from monolm.study.sequential import run_seed

    cfg = micro_config(tmp_path)
    refs = run_seed(cfg, 42, stages=6, progress=False)
    settings = {
        "train_baseline": "micro_batch_size",
        "train_monotonic": "micro_batch_size",
        "evaluate": "evaluation.batch_size",
        "uat": "attacks.uat.score_batch_size",
        "hotflip": "attacks.hotflip.score_batch_size",
    }
    for stage, setting in settings.items():
        plan = refs[stage].metrics["memory_plan"]
        manifest = json.loads((stage_dir(cfg, 42, stage) / "manifest.json").read_text())
        assert manifest["metrics"]["memory_plan"] == plan
        assert plan["setting"] == setting and plan["estimate_bytes"] > 0
        assert plan["capacity_bytes"] is None and "cpu" in plan["device"]  # CPU: recorded, not enforced
        assert plan["chosen"] == plan["requested"]
    monotonic, baseline = refs["train_monotonic"].metrics["memory_plan"], refs["train_baseline"].metrics["memory_plan"]
    assert monotonic["breakdown"]["constrained_w"] > 0 == baseline["breakdown"]["constrained_w"]
    assert baseline["grad_accum_chosen"] == 1 and refs["train_baseline"].metrics["effective_batch_size"] == 4


def test_stage_plans_apply_to_the_settings_they_govern(tmp_path):
    """With a card's capacity forced on the CPU: a smaller micro-batch with more accumulation, a
    smaller evaluation batch and candidate batch; the config itself is not changed."""
    from monolm.data.splits import train_bpe_tokenizer
    from monolm.models import loading as models

    cfg = micro_config(
        tmp_path,
        "training.common.micro_batch_size=4",
        "training.common.grad_accum_steps=2",
        "attacks.uat.grad_batch_size=1",  # so that the candidate batch, not the gradient pass, decides
    )
    tokenizer = train_bpe_tokenizer(["a small corpus of text for a tokenizer"] * 20, 300)
    model_dir = tmp_path / "model"
    models.save_model(models.build_tiny_model(cfg.model.tiny, tokenizer, seed=0), tokenizer, model_dir)
    recipe = cfg.training.arm("monotonic")
    _, full = planning.plan_train_stage(cfg, "monotonic", recipe, model_dir, "cpu")
    at_two = memory.training_bytes(
        full_shape := planning.shape_of_dir(model_dir),
        micro_batch=2,
        seq_len=cfg.data.seq_len,
        bf16=False,
        checkpointing=False,
        constrained_parameters=full_shape.constrained_parameters(cfg.constraint.variant),
        foreach_optimizer=False,
    )["peak"]
    planned, plan = planning.plan_train_stage(cfg, "monotonic", recipe, model_dir, "cpu", capacity=at_two)
    assert (planned.micro_batch_size, planned.grad_accum_steps) == (2, 4) and plan.changed
    assert planned.effective_batch_size == recipe.effective_batch_size == 8
    assert cfg.training.common.micro_batch_size == 4  # the stage's config (and cache key) is untouched

    shape = planning.shape_of_dir(model_dir)
    room = memory.inference_bytes(shape, batch=3, seq_len=cfg.eval_seq_len, bf16=False)["peak"]
    evaluation_plan = planning.plan_eval_stage(cfg, model_dir, "cpu", capacity=room)
    assert evaluation_plan.chosen == 3 < cfg.evaluation.batch_size
    uat_cfg, uat_plan = planning.plan_attack_stage(cfg, "uat", model_dir, "cpu", capacity=uat_capacity(cfg, model_dir))
    assert uat_cfg.score_batch_size == uat_plan.chosen < cfg.attacks.uat.score_batch_size
    with pytest.raises(memory.MemoryPlanError, match="tiny-neox"):
        planning.plan_train_stage(cfg, "baseline", recipe, model_dir, "cpu", capacity=1000)


def uat_capacity(cfg, model_dir) -> int:
    """Room for half of the configured candidate batch (and the gradient pass, whichever is larger)."""
    shape = planning.shape_of_dir(model_dir)
    seq, targets, grad_rows = planning.attack_lengths(cfg, "uat")
    score = memory.inference_bytes(shape, batch=cfg.attacks.uat.score_batch_size // 2, seq_len=seq, bf16=False,
                                   resident_models=2, logit_positions=targets, weight_cache=False)  # fmt: skip
    grad = memory.gradient_pass_bytes(shape, batch=grad_rows, seq_len=seq, bf16=False, resident_models=2)
    fixed = score["weights"] + 4 * shape.constrained_parameters(cfg.constraint.variant)
    return fixed + max(score["peak"] - score["weights"], grad["peak"] - grad["weights"])


def test_resume_survives_a_new_micro_batch_split(tmp_path):
    """A retried stage on another card may get another micro-batch from the plan: the checkpoint
    still resumes (same effective batch), and the result matches an uninterrupted run."""
    from monolm.training import train

    def recipe(micro: int, accum: int) -> ArmConfig:
        return ArmConfig(lr=1e-3, epochs=100.0, max_steps=4, warmup_ratio=0.0, schedule="constant",
                         micro_batch_size=micro, grad_accum_steps=accum, log_every_steps=1,
                         checkpoint_every_steps=1, gradient_checkpointing="off", bf16="off")  # fmt: skip

    blocks = counter_blocks()
    whole = train(tiny_neox(), blocks, recipe(4, 2), tmp_path / "whole", seed=1, evaluate=None, progress=False)
    first = train(tiny_neox(), blocks, recipe(4, 2), tmp_path / "split", seed=1, evaluate=None, progress=False,
                  max_steps_this_call=2)  # fmt: skip
    assert first.steps == 2
    second = train(tiny_neox(), blocks, recipe(2, 4), tmp_path / "split", seed=1, evaluate=None, progress=False)
    assert second.resumed_from is not None and second.steps == 4
    a, b = whole.history["log"][-1]["train_loss"], second.history["log"][-1]["train_loss"]
    assert b == pytest.approx(a, rel=1e-4)


def test_plan_command_prints_every_gpu_stage_for_both_cards(capsys):
    from flows.cli import main

    assert main(["plan", "--preset", "full"]) == 0
    out = capsys.readouterr().out
    assert "pythia-1.4b: 1,414,647,808 parameters" in out
    assert "A100-40GB batch" in out and "A100-80GB batch" in out
    for stage in ("constrain", "train_baseline", "train_monotonic", "evaluate", "uat", "hotflip", "damage"):
        assert any(line.startswith(stage) for line in out.splitlines()), stage
    assert "does not fit" not in out
    assert "Minimum detectable effect (MDE) of each headline test at 80% power" in out
    train = next(line for line in out.splitlines() if line.startswith("train_baseline"))
    assert "4 x 8" in train  # micro-batch x accumulation of the full preset


def test_plan_command_names_random_weights_and_what_does_not_fit(capsys):
    from flows.cli import main

    sets = ["model.source=architecture", "model.architecture=pythia-2.8b", "data.source=embedded",
            "training.common.gradient_checkpointing='off'"]  # fmt: skip
    assert main(["plan", "--preset", "full", *[a for s in sets for a in ("--set", s)]]) == 0
    out = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in out
    assert "train_baseline on A100-40GB: pythia-2.8b does not fit A100-40GB" in out
    assert torch.__version__  # the plan needs torch only for the meta-device count


def test_each_attack_declares_its_lengths_and_an_unknown_one_is_refused():
    """Planning takes an attack's sequence lengths from its own declaration (the registry's
    AttackSpec), the config checks and stage 0 its text budget; an attack planning does not know
    is an error, not another attack's lengths."""
    from monolm.config import load_config
    from monolm.study.registry import attack_text_budget

    cfg = load_config("tiny")
    uat, flip = cfg.attacks.uat, cfg.attacks.hotflip
    assert planning.attack_lengths(cfg, "uat") == (
        1 + uat.trigger_len + uat.text_max_tokens,
        uat.text_max_tokens,
        uat.grad_batch_size,
    )
    assert planning.attack_lengths(cfg, "hotflip") == (1 + flip.text_max_tokens, flip.text_max_tokens, 1)
    assert attack_text_budget(cfg)[:2] == (uat.n_opt_texts, max(uat.n_eval_texts, flip.n_texts))
    with pytest.raises(ValueError, match="unknown attack 'random_trigger'; known: uat, hotflip, gcg"):
        planning.attack_lengths(cfg, "random_trigger")
