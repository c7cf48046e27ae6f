"""The Pythia suite's architectures as data (`catalogue.yaml`), and randomly initialised models
of exactly those shapes, built without any download.

Why: benchmarks, memory plans and dry runs at the study's real size (Pythia-1.4B) must not depend
on the hub. A model built here has the published shape and parameter count but random weights;
`model.source: architecture` names it so everywhere (`RANDOM_WEIGHTS_NOTE`).

No torch or transformers import at module level: the config schema validates names against
`names()`, and answering a bad config must stay quick.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DATA_FILE = Path(__file__).with_name("catalogue.yaml")
RANDOM_WEIGHTS_NOTE = (
    "RANDOM WEIGHTS: this model has the architecture of {name} but was randomly initialised "
    "(model.source='architecture'), not pre-trained; its numbers say nothing about {name}"
)


def _config_field(key: str) -> property:
    """A read-only number of an architecture: its GPT-NeoX config's `key`."""

    def get(self: Architecture) -> int:
        return self.config[key]

    return property(get, doc=f"The config's `{key}`.")


@dataclass(frozen=True)
class Architecture:
    """One shipped architecture: its name, the hub id of the published model, the GPT-NeoX config
    fields, and the published total parameter count."""

    name: str
    hub_id: str
    config: dict[str, Any]
    parameters: int

    # The shape's numbers, read from the config under their GPT-NeoX names.
    layers = _config_field("num_hidden_layers")
    hidden = _config_field("hidden_size")
    heads = _config_field("num_attention_heads")
    ffn = _config_field("intermediate_size")
    vocab = _config_field("vocab_size")
    max_positions = _config_field("max_position_embeddings")

    def note(self) -> str:
        return RANDOM_WEIGHTS_NOTE.format(name=self.name)


@functools.cache
def _load() -> dict[str, Architecture]:
    raw = yaml.safe_load(DATA_FILE.read_text())
    common = raw["common"]
    out = {}
    for name, entry in raw["architectures"].items():
        entry = dict(entry)
        hub_id, parameters = entry.pop("hub_id"), entry.pop("parameters")
        out[name] = Architecture(name=name, hub_id=hub_id, config={**common, **entry}, parameters=parameters)
    return out


def names() -> list[str]:
    """The shipped architectures, smallest first."""
    return sorted(_load(), key=lambda n: _load()[n].parameters)


def get(name: str) -> Architecture:
    """The architecture called `name`; a ValueError listing the shipped ones otherwise."""
    try:
        return _load()[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; shipped: {', '.join(names())}") from None


def for_hub_id(model_id: str) -> Architecture | None:
    """The shipped architecture of a published model id (`EleutherAI/pythia-1.4b`, also its
    `-deduped` and `-v0` variants, which share the shape), or None."""
    stem = model_id.rstrip("/").rsplit("/", 1)[-1].lower()
    stem = re.sub(r"(-deduped)?(-v0)?$", "", stem)
    return _load().get(stem)


def hf_config(arch: Architecture, **overrides: Any):
    """The `GPTNeoXConfig` of `arch` (`overrides` e.g. `vocab_size`, `pad_token_id`)."""
    from transformers import GPTNeoXConfig

    fields = {k: v for k, v in arch.config.items() if k != "model_type"}
    return GPTNeoXConfig(**{**fields, **overrides})


def build_model(arch: Architecture | str, *, seed: int = 0, device: str | None = None, **overrides: Any):
    """A randomly initialised fp32 `GPTNeoXForCausalLM` of exactly `arch`'s shape, seeded under a
    forked RNG (the global RNG is left alone). `device="meta"` builds it without allocating
    memory (parameter counts, memory plans)."""
    import torch
    from transformers import GPTNeoXForCausalLM

    arch = get(arch) if isinstance(arch, str) else arch
    config = hf_config(arch, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if device is not None:
            with torch.device(device):
                model = GPTNeoXForCausalLM(config)
        else:
            model = GPTNeoXForCausalLM(config)
    return model.float()
