"""Models: fetch from the hub, build the offline tiny stand-in or a shipped architecture with random
weights, save and load (safetensors only).

Any Hugging Face causal LM id works (default `EleutherAI/pythia-1.4b`); a saved model directory
works the same way. Weights are always loaded in fp32: bf16 is for compute (autocast) only.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from monolm.config import ModelConfig, TinyModelConfig
from monolm.core.artifacts import atomic_dir
from monolm.core.errors import PermanentError, hub_offline

log = logging.getLogger("monolm.models")

# Only these files are fetched from the hub: configs, tokenizer files and safetensors weights.
# Never *.bin / *.pt (pickles).
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model"]


class ModelError(RuntimeError):
    """A model that cannot be fetched or loaded, with the id/path in the message."""


class ModelUnavailable(ModelError, PermanentError):
    """A model no retry can bring: not on the hub, not cached on an offline machine (HF_HUB_OFFLINE),
    no safetensors weights, or not a saved model directory."""


def padded_vocab_size(n_tokens: int, multiple: int) -> int:
    return -(-n_tokens // multiple) * multiple


def tiny_config(tiny: TinyModelConfig, vocab_rows: int, **token_ids: int | None):
    """The GPT-NeoX config of the offline tiny model (Pythia's architecture at a small size)."""
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=vocab_rows,
        hidden_size=tiny.hidden_size,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        intermediate_size=tiny.intermediate_size,
        max_position_embeddings=tiny.max_position_embeddings,
        rotary_pct=0.25,  # as Pythia
        use_parallel_residual=True,
        tie_word_embeddings=False,
        **token_ids,
    )


def build_tiny_model(tiny: TinyModelConfig, tokenizer, seed: int) -> nn.Module:
    """A GPT-NeoX (Pythia's architecture) from a small config, randomly initialised from `seed`.

    The embedding has more rows than the tokenizer has tokens (padded to a multiple, as Pythia's
    50304 rows exceed its 50277-token tokenizer), so the attacks' unused-row exclusion is exercised.
    """
    from transformers import GPTNeoXForCausalLM

    config = tiny_config(
        tiny,
        padded_vocab_size(len(tokenizer), tiny.pad_vocab_to_multiple_of),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = GPTNeoXForCausalLM(config)
    return model.float()


def build_architecture_model(architecture: str, tokenizer, seed: int) -> nn.Module:
    """A randomly initialised model of a shipped architecture (`monolm/models/catalogue.yaml`), seeded
    from `seed`, with the architecture's own embedding rows (50,304 for Pythia) and the
    tokenizer's special tokens. Nothing is downloaded and nothing is pre-trained: the saved
    config carries `monolm_random_weights` so that every copy of the model (trained, constrained)
    says so."""
    from monolm.models import catalogue as architectures

    arch = architectures.get(architecture)
    if len(tokenizer) > arch.vocab:
        raise ModelError(
            f"the tokenizer has {len(tokenizer)} tokens but {arch.name} has {arch.vocab} embedding rows; "
            f"lower model.tiny.vocab_size"
        )
    model = architectures.build_model(
        arch,
        seed=seed,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.config.monolm_random_weights = arch.note()
    log.warning("%s", arch.note())
    return model


def build_offline_model(model_cfg: ModelConfig, tokenizer, seed: int) -> nn.Module:
    """The stage-0 model of an offline source: the tiny stand-in (pre-trained afterwards) or a
    shipped architecture with random weights."""
    if model_cfg.source == "architecture":
        return build_architecture_model(model_cfg.architecture, tokenizer, seed)
    if model_cfg.source == "tiny":
        return build_tiny_model(model_cfg.tiny, tokenizer, seed)
    raise ValueError(f"model.source={model_cfg.source!r} is not built offline")


def random_weights_note(model_or_config) -> str | None:
    """The note a model built from an architecture carries (None for a pre-trained model)."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "monolm_random_weights", None)


def max_sequence_length(model_or_config) -> int:
    config = getattr(model_or_config, "config", model_or_config)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ModelError(f"cannot tell the maximum sequence length of {type(config).__name__}")


def fetch_hub_model(name: str, revision: str, cache_dir: Path) -> Path:
    """Download (or find in the cache) a hub model's config, tokenizer and safetensors weights.

    Offline, this fails fast with the id in the message instead of hanging: hub timeouts are
    short, and a missing safetensors file is an error (we never unpickle `.bin` weights).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "60")
    try:
        path = Path(
            snapshot_download(repo_id=name, revision=revision, cache_dir=str(cache_dir), allow_patterns=HUB_PATTERNS)
        )
    except RepositoryNotFoundError:
        raise ModelUnavailable(
            f"model {name!r} (revision {revision!r}) does not exist on the hub or is private"
        ) from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        offline = isinstance(exc, LocalEntryNotFoundError) and hub_offline()
        raise (ModelUnavailable if offline else ModelError)(
            f"cannot fetch model {name!r} (revision {revision!r}) from the hub and it is not in the cache "
            f"{cache_dir}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    if not any(path.glob("*.safetensors")):
        raise ModelUnavailable(f"model {name!r} has no safetensors weights; monolm refuses pickled .bin weights")
    return path


def load_model(path: str | Path, device: torch.device | str | None = None) -> nn.Module:
    """Load a saved model directory in fp32, eval mode. A constrained model (stage 1/3 output,
    recognised by its `constraint.json`) comes back with its parametrization intact."""
    path = Path(path)
    if (path / "constraint.json").is_file():
        from monolm.constraint.softplus import load_constrained

        model = load_constrained(path)
    else:
        from transformers import AutoModelForCausalLM

        if not (path / "config.json").is_file():
            raise ModelUnavailable(f"{path} is not a saved model directory (no config.json)")
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
        except OSError as exc:
            raise ModelError(f"cannot load model from {path}: {exc}") from None
    model.eval()
    return model.to(device) if device is not None else model


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def save_model(model: nn.Module, tokenizer, out_dir: str | Path) -> list[str]:
    """Save an (unconstrained) model + tokenizer as safetensors, atomically (`atomic_dir`: built
    beside `out_dir`, then renamed into place). Returns the saved files (relative)."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, existing="replace") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
