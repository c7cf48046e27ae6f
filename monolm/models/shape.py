"""The model's shape and parameter count, known before any compute, for every `model.source`; and
whether the configured constraint variant fits it.

One description of the model for its every user: preflight (`monolm run`, the flow, `--variants
all`), `monolm verify`'s variant check, `monolm plan` and the stages' memory plans, and the
cross-cell report's parameter counts. A `gated_all` on a GPT-NeoX (non-gated MLPs) is refused in
seconds, not after stage 0 has pre-trained or downloaded the model.

No torch or transformers import at module level: `monolm plan` on a bad config must stay quick.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from monolm.config import ConfigError, ExperimentConfig
from monolm.memory.estimates import ModelShape

if TYPE_CHECKING:
    from torch import nn


class ShapeUnknown(ValueError):
    """The model's shape cannot be known without downloading it."""


def transformers_config(cfg: ExperimentConfig) -> Any | None:
    """The model's transformers config when it is known without downloading anything: the tiny
    preset's (from `model.tiny`), a shipped architecture's (`model.source: architecture`), a local
    model's `config.json`, or a hub model's `config.json` already in the Hugging Face cache. None
    when it is not known yet (a hub model never fetched: its variant is checked by stage 1)."""
    from monolm.models import catalogue
    from monolm.models.loading import padded_vocab_size, tiny_config

    m = cfg.model
    if m.source == "tiny":
        return tiny_config(m.tiny, padded_vocab_size(m.tiny.vocab_size, m.tiny.pad_vocab_to_multiple_of))
    if m.source == "architecture":
        return catalogue.hf_config(catalogue.get(m.architecture))
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
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def count_parameters(config: Any) -> int:
    """Parameter count of the model `config` describes (built on the meta device: no memory)."""
    return sum(p.numel() for p in skeleton(config).parameters())


def shape_of_config(config: Any, name: str) -> ModelShape:
    """The shape of the model `config` describes, its parameters counted (`count_parameters`)."""
    return ModelShape.from_config(config, name, count_parameters(config))


def shape_of_dir(path: str | Path, name: str | None = None) -> ModelShape:
    """The shape of a saved model directory (its config.json; constrained ones too)."""
    from transformers import AutoConfig

    return shape_of_config(AutoConfig.from_pretrained(path), name or Path(path).name)


def model_shape(cfg: ExperimentConfig) -> ModelShape:
    """The base model's shape before stage 0 has run (no download); `ShapeUnknown` naming
    `model.name` when only a download would tell. A shipped architecture (by name or by its hub
    id) takes the catalogue's shape and published parameter count (equal to the counted one,
    tests/test_architectures.py) without building it."""
    from monolm.models import catalogue

    m = cfg.model
    arch = catalogue.get(m.architecture) if m.source == "architecture" else None
    if m.source == "hub":
        arch = catalogue.for_hub_id(m.name)
    if arch is not None:
        return ModelShape.from_architecture(arch)
    config = transformers_config(cfg)
    if config is None:
        raise ShapeUnknown(
            f"cannot tell the shape of model.name={m.name!r} offline: it is not a shipped architecture "
            "and its config is not in the HF cache (run `monolm verify` or stage 0 first)"
        )
    return shape_of_config(config, m.slug if m.source == "tiny" else m.name)


def check_variant(cfg: ExperimentConfig) -> str | None:
    """Refuse a `constraint.variant` the model's architecture does not have with `ConfigError`
    naming the field; otherwise say what it constrains. None when the architecture is not known
    without a download (a hub model not fetched yet: stage 1 checks it then)."""
    from monolm.constraint.softplus import resolve_targets

    config = transformers_config(cfg)
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
