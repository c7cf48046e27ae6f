"""What many test files share: the `micro` configuration of the tiny preset (the whole pipeline
in seconds: same code, smaller numbers) and where a cell's stage folders are."""

from __future__ import annotations

from pathlib import Path

# Everything the full pipeline does, on numbers small enough for a test.
MICRO = [
    "model.tiny.hidden_size=64", "model.tiny.num_layers=2", "model.tiny.num_heads=2",
    "model.tiny.intermediate_size=256", "model.tiny.vocab_size=500", "model.tiny.pretrain_steps=40",
    "model.tiny.pretrain_batch_size=8", "model.tiny.max_position_embeddings=128",
    "data.seq_len=64", "data.n_eval_docs=12", "data.n_attack_docs=20",
    "constraint.drift_docs=4", "constraint.monotonicity_pairs=32",
    "training.common.max_steps=4", "training.common.micro_batch_size=4", "training.common.grad_accum_steps=1",
    "training.common.eval_every_steps=2", "training.common.eval_max_docs=6", "training.common.checkpoint_every_steps=2",
    "training.common.log_every_steps=1",
    "evaluation.max_docs=8",
    "attacks.uat.trigger_len=2", "attacks.uat.top_k=6", "attacks.uat.restarts=1", "attacks.uat.max_sweeps=1",
    "attacks.uat.n_opt_texts=6", "attacks.uat.n_eval_texts=8", "attacks.uat.text_max_tokens=24",
    "attacks.hotflip.max_flips=2", "attacks.hotflip.top_b=6", "attacks.hotflip.n_texts=8",
    "attacks.hotflip.text_max_tokens=20", "attacks.hotflip.block_size=4",
    "runner.retries=1", "runner.retry_delay_seconds=0",
]


def micro_sets(tmp: Path, *extra: str) -> list[str]:
    return [*MICRO, f"paths.runs_root={tmp / 'runs'}", f"paths.results_root={tmp / 'results'}", *extra]


def micro_config(tmp: Path, *extra: str):
    from monolm.config import load_config

    return load_config("tiny", sets=micro_sets(tmp, *extra))


def stage_dir(cfg, seed: int, stage: str) -> Path:
    """The folder of `stage` of `seed` under `cfg` (as the pipeline resolves it)."""
    from monolm.layout import cell_paths

    return cell_paths(cfg, seed).stage(stage)
