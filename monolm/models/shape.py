"""Which architecture a run's model has, known before any compute, and whether the configured
constraint variant fits it: a `gated_all` on a GPT-NeoX (non-gated MLPs) is refused by
`monolm run`, the flow and `monolm verify` in seconds, not after stage 0 has pre-trained or
downloaded the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from monolm.config import ConfigError, ExperimentConfig
from monolm.constraint.softplus import resolve_targets
from monolm.models.loading import padded_vocab_size, tiny_config


def architecture_config(cfg: ExperimentConfig) -> Any | None:
    """The model's transformers config when it is known without downloading anything: the tiny
    preset's (from `model.tiny`), a local model's `config.json`, or a hub model's `config.json`
    already in the Hugging Face cache. None when it is not known yet (a hub model never fetched)."""
    m = cfg.model
    if m.source == "tiny":
        return tiny_config(m.tiny, padded_vocab_size(m.tiny.vocab_size, m.tiny.pad_vocab_to_multiple_of))
    from transformers import AutoConfig

    try:
        if m.source == "local":
            return AutoConfig.from_pretrained(str(Path(m.name).resolve()))
        return AutoConfig.from_pretrained(
            m.name, revision=m.revision, cache_dir=str(cfg.hf_cache_dir), local_files_only=True
        )
    except (OSError, ValueError):
        return None


def skeleton(config: Any) -> nn.Module:
    """A weightless model of `config`'s architecture (on the meta device: no memory, no init)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def check_variant(cfg: ExperimentConfig) -> str | None:
    """Refuse a `constraint.variant` the model's architecture does not have with `ConfigError`
    naming the field; otherwise say what it constrains. None when the architecture is not known
    without a download (a hub model not fetched yet: stage 1 checks it then)."""
    config = architecture_config(cfg)
    if config is None:
        return None
    try:
        model = skeleton(config)
    except Exception:  # an architecture transformers cannot build here: stage 1 will say why
        return None
    variant = cfg.constraint.variant
    try:
        targets = resolve_targets(model, variant)
    except ValueError as exc:
        raise ConfigError(f"constraint.variant={variant!r} does not fit model {cfg.model.name!r}: {exc}") from None
    roles = ", ".join(sorted({t.role for t in targets}))
    return f"{variant}: {len(targets)} Linear modules ({roles}) in {type(model).__name__}"
