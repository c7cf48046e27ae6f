"""What many test files share: the `micro` configuration of the tiny preset (the whole pipeline
in seconds: same code, smaller numbers), where a cell's stage folders are, and a tiny GPT-NeoX
(Pythia's architecture) with a learnable toy corpus for the training, checkpoint, evaluation and
resilience tests."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

# Everything the full pipeline does, on numbers small enough for a test.
MICRO = [
    "model.tiny.hidden_size=64",
    "model.tiny.num_layers=2",
    "model.tiny.num_heads=2",
    "model.tiny.intermediate_size=256",
    "model.tiny.vocab_size=500",
    "model.tiny.pretrain_steps=40",
    "model.tiny.pretrain_batch_size=8",
    "model.tiny.max_position_embeddings=128",
    "data.seq_len=64",
    "data.n_val_docs=6",
    "data.n_test_docs=8",
    "data.n_attack_docs=20",
    "constraint.drift_docs=4",
    "constraint.monotonicity_pairs=32",
    "training.common.max_steps=4",
    "training.common.micro_batch_size=4",
    "training.common.grad_accum_steps=1",
    "training.common.eval_every_steps=2",
    "training.common.eval_max_docs=6",
    "training.common.checkpoint_every_steps=2",
    "training.common.log_every_steps=1",
    "evaluation.max_docs=8",
    "attacks.uat.trigger_len=2",
    "attacks.uat.top_k=6",
    "attacks.uat.restarts=1",
    "attacks.uat.max_sweeps=1",
    "attacks.uat.n_opt_texts=6",
    "attacks.uat.n_eval_texts=8",
    "attacks.uat.text_max_tokens=24",
    "attacks.hotflip.max_flips=2",
    "attacks.hotflip.top_b=6",
    "attacks.hotflip.n_texts=8",
    "attacks.hotflip.text_max_tokens=20",
    "attacks.hotflip.block_size=4",
    "attacks.gcg.trigger_len=2",
    "attacks.gcg.steps=2",
    "attacks.gcg.search_width=4",
    "attacks.gcg.topk=6",
    "attacks.gcg.restarts=1",
    "attacks.gcg.n_opt_texts=6",
    "attacks.gcg.n_eval_texts=8",
    "attacks.gcg.text_max_tokens=24",
    "runner.retries=1",
    "runner.retry_delay_seconds=0",
    'controls.ladder.rungs=["step10","step30"]',  # snapshots below the micro pre-training's 40 steps
]


def micro_sets(tmp: Path, *extra: str) -> list[str]:
    return [*MICRO, f"paths.runs_root={tmp / 'runs'}", f"paths.results_root={tmp / 'results'}", *extra]


def slurm_sets(root: Path, *extra: str) -> list[str]:
    """The micro sets with the `slurm` profile for the local cluster (infra/slurm/local-slurm.sh):
    one CPU and one a100 per worker job, at most two jobs; workers activate this venv and report to
    the caller's Prefect server (exported by the profile). Shared by tests/test_slurm.py and
    bench/slurm_profile.py, so the benchmark times the configuration the tests prove."""
    venv = Path(sys.executable).parent
    return micro_sets(
        root,
        "runner.profile=slurm",
        "runner.slurm.partition=gpu",
        "runner.slurm.cores=1",
        "runner.slurm.memory=3GB",
        "runner.slurm.walltime=00:20:00",
        "runner.slurm.lifetime_margin_minutes=5",
        "runner.slurm.min_workers=0",
        "runner.slurm.max_workers=2",
        "runner.slurm.allow_sqlite=true",  # one node: the jobs share this disk
        f"runner.slurm.python={sys.executable}",
        f"runner.slurm.prologue={json.dumps([f'source {venv}/activate', 'export MONOLM_TORCH_THREADS=1'])}",
        f"runner.slurm.log_directory={root / 'slurm-logs'}",
        *extra,
    )


def micro_config(tmp: Path, *extra: str):
    from monolm.config import load_config

    return load_config("tiny", sets=micro_sets(tmp, *extra))


def stage_dir(cfg, seed: int, stage: str) -> Path:
    """The folder of `stage` of `seed` under `cfg` (as the pipeline resolves it)."""
    from monolm.study.layout import cell_paths

    return cell_paths(cfg, seed).stage(stage)


# --------------------------------------------------------------------------- a tiny GPT-NeoX
VOCAB, SEQ = 128, 32


def tiny_neox(
    *,
    seed: int = 0,
    hidden: int = 64,
    vocab: int = VOCAB,
    layers: int = 2,
    heads: int = 4,
    max_positions: int = 64,
    dropout: float = 0.0,
    constrained: bool = False,
    **config,
):
    """A fp32 GPT-NeoX built from a config (no download), seeded under a forked RNG so building it
    leaves the global RNG alone; `constrained` applies monolm's own constraint to it (`constrain`).
    Extra keyword arguments go to `GPTNeoXConfig` (e.g. `initializer_range`)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=max_positions,
        hidden_dropout=dropout,
        attention_dropout=dropout,
        **config,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = GPTNeoXForCausalLM(cfg).float()
    return constrain(model) if constrained else model


def constrain(model: nn.Module, variant: str = "mlp_in", init: str = "abs") -> nn.Module:
    """The study's own constraint on `model` (`monolm.constraint.softplus.apply_constraint`:
    W = softplus(V) on the variant's Linear weights, V from the `init` conversion), so the
    training, checkpoint, resume and kill tests exercise the real parametrization."""
    from monolm.constraint.softplus import apply_constraint

    apply_constraint(model, variant, init)
    return model


# --------------------------------------------------------------------------- training recipes
# What every CPU test recipe shares: no gradient checkpointing, fp32 compute.
CPU_RECIPE = dict(gradient_checkpointing="off", bf16="off")
# The test modules' recipes, one row each: the values of RECIPE_FIELDS, then the recipe's own fields.
RECIPE_FIELDS = (
    "lr",
    "max_steps",
    "micro_batch_size",
    "grad_accum_steps",
    "log_every_steps",
    "eval_every_steps",
    "checkpoint_every_steps",
)
CONSTANT_LR = dict(warmup_ratio=0.0, schedule="constant")
RECIPES = {
    # The loop tests (test_training): 6 steps of 4 x 2 sequences, evaluated every 3, no checkpoint.
    "loop": ((1e-3, 6, 4, 2, 2, 3, 100), dict(epochs=100.0, **CONSTANT_LR)),
    # The weight-decay tests: 4 steps of strong decay without clipping, a checkpoint every 2.
    "decay": ((0.1, 4, 4, 1, 1, 100, 2), dict(weight_decay=0.1, grad_clip=None, **CONSTANT_LR)),
    # The checkpoint and kill tests: 40 sequences / batch 8 = 5 steps per epoch, so 12 steps cross
    # two epoch boundaries.
    "resume": (
        (3e-3, 12, 4, 2, 5, 4, 4),
        dict(epochs=3.0, warmup_ratio=0.25, schedule="cosine", min_lr_ratio=0.1, keep_last_checkpoints=3),
    ),
}


def arm_config(**settings):
    """An `ArmConfig` for a CPU test: `CPU_RECIPE` plus `settings`."""
    from monolm.config import ArmConfig

    return ArmConfig(**{**CPU_RECIPE, **settings})


def recipe(name: str, **overrides):
    """The `ArmConfig` of the test recipe `name` (`RECIPES`, on top of `CPU_RECIPE`), with `overrides`."""
    values, own = RECIPES[name]
    return arm_config(**{**dict(zip(RECIPE_FIELDS, values, strict=True)), **own, **overrides})


def resume_recipe(**overrides):
    """The recipe of the checkpoint and kill tests (`RECIPES["resume"]`), with `overrides`."""
    return recipe("resume", **overrides)


def counter_blocks(n: int = 48, seed: int = 1, *, seq: int = SEQ, vocab: int = VOCAB) -> torch.Tensor:
    """[n, seq] token blocks of a noisy counter: structured enough to learn, so a loss moves."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    counting = (start + torch.arange(seq)) % vocab
    noise = torch.randint(0, vocab, (n, seq), generator=g)
    return torch.where(torch.rand(n, seq, generator=g) < 0.2, noise, counting)
