"""The two held-out measurements several stages take, written once so that they stay the same
measurement everywhere:

- the validation loss that picks a training arm's best checkpoint (stages 2 and 3), which the
  damage-matched arm re-measures to match it;
- the test-part perplexity stage 4 reports, which the damage arm and the quality ladder compute
  for their own models so that every model is compared on the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from monolm.config import ArmConfig, ExperimentConfig
from monolm.data import splits as data_lib
from monolm.evaluation.perplexity import perplexity


def validation_evaluator(
    cfg: ExperimentConfig, recipe: ArmConfig, tokenizer, texts: list[str], device
) -> Callable[[nn.Module], dict[str, Any]]:
    """The held-out perplexity that picks the best checkpoint, in the arm's own precision:
    `evaluate(model) -> {"perplexity", "loss", "tokens"}` on `texts` (tokenized once)."""
    docs = data_lib.tokenize(tokenizer, texts)

    def evaluate(model: nn.Module) -> dict[str, Any]:
        result = perplexity(
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


def perplexity_on_test(
    cfg: ExperimentConfig,
    model: nn.Module,
    tokenizer,
    docs: list[list[int]],
    texts: list[str],
    *,
    batch_size: int,
    device,
    progress: bool,
) -> dict[str, Any]:
    """Test-part perplexity as stage 4 computes it (evaluation windows, the evaluation's
    precision), with byte and word counts from `texts` and per-document losses."""
    return perplexity(
        model,
        docs,
        seq_len=cfg.eval_seq_len,
        batch_size=batch_size,
        prefix_token_id=tokenizer.eos_token_id,
        texts=texts,
        device=device,
        progress=progress,
        return_per_doc=True,
        bf16=cfg.evaluation.bf16,
    )
