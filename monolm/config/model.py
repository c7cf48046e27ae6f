"""`model`: which model the study constrains (a hub id, a saved directory, the offline tiny
stand-in, or a shipped architecture with random weights) and the tiny model's shape."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import model_validator

from monolm.config.base import NonNegInt, PositiveFloat, PositiveInt, Strict
from monolm.config.controls import TinySnapshots


class TinyModelConfig(TinySnapshots):
    """The offline GPT-NeoX stand-in for Pythia, built from a config and pre-trained in stage 0."""

    vocab_size: PositiveInt = 2000  # BPE vocabulary; the embedding is padded to 2048 rows
    pad_vocab_to_multiple_of: PositiveInt = 64  # like Pythia (50304 rows > tokenizer): unused rows
    hidden_size: PositiveInt = 128
    num_layers: PositiveInt = 4
    num_heads: PositiveInt = 4
    intermediate_size: PositiveInt = 512
    max_position_embeddings: PositiveInt = 256
    pretrain_steps: NonNegInt = 150
    pretrain_lr: PositiveFloat = 3e-3
    pretrain_batch_size: PositiveInt = 16

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.tiny.hidden_size={self.hidden_size} must be divisible by model.tiny.num_heads={self.num_heads}"
            )
        return self


class ModelConfig(Strict):
    # hub: a Hugging Face id; local: a saved model directory; tiny: the offline stand-in;
    # architecture: a shipped architecture (monolm/models/catalogue.yaml) with RANDOM weights, no download.
    source: Literal["hub", "local", "tiny", "architecture"] = "hub"
    # A Hugging Face causal-LM id (source=hub) or a saved model directory (source=local). With
    # source=architecture it is derived and says that the weights are random.
    name: str = "EleutherAI/pythia-1.4b"
    revision: str = "main"
    # source=architecture only: which shipped architecture, e.g. pythia-1.4b (its tokenizer is a
    # byte-level BPE of model.tiny.vocab_size tokens trained on the train split, as for tiny)
    architecture: str | None = None
    cache_dir: Path | None = None  # HF cache; None -> <paths.cache_dir>/hf
    tiny: TinyModelConfig = TinyModelConfig()
    # The model's name on the grid's model axis and in folders: the key of its `models:` entry
    # (set from it); None for the default `model`, whose name is derived from it (`slug`).
    label: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _architecture_name(cls, data: Any) -> Any:
        """With source=architecture the model's name says, wherever it is printed (folders, run
        names, reports, the results store), that the weights are random."""
        if isinstance(data, dict) and data.get("source") == "architecture" and data.get("architecture"):
            data = {**data, "name": f"{data['architecture']} (RANDOM WEIGHTS, not pre-trained)"}
        return data

    @model_validator(mode="after")
    def _known_architecture(self) -> ModelConfig:
        from monolm.models import catalogue as architectures

        if self.source == "architecture":
            if self.architecture is None:
                raise ValueError(
                    "model.architecture is required with model.source='architecture'; "
                    f"allowed: {', '.join(architectures.names())}"
                )
            if self.architecture not in architectures.names():
                raise ValueError(
                    f"model.architecture={self.architecture!r} is not a shipped architecture; "
                    f"allowed: {', '.join(architectures.names())}"
                )
        elif self.architecture is not None:
            raise ValueError(
                f"model.architecture={self.architecture!r} is only used with model.source='architecture' "
                f"(model.source is {self.source!r})"
            )
        return self

    @property
    def random_weights(self) -> bool:
        """True when the model is an architecture with random weights (nothing pre-trained)."""
        return self.source == "architecture"

    @property
    def slug(self) -> str:
        """Folder-safe model name: the grid label if set, else derived from the model
        (`EleutherAI/pythia-1.4b` -> `EleutherAI--pythia-1.4b`)."""
        if self.label is not None:
            return self.label
        if self.source == "tiny":
            return "tiny-neox"
        if self.source == "architecture":
            return f"{self.architecture}-random-weights"
        return self.name.rstrip("/").replace("/", "--").replace(":", "-")
