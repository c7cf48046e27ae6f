"""`model` and `data`: which model the study constrains (a hub id, a saved directory, the offline
tiny stand-in, or a shipped architecture with random weights, and the tiny model's shape), and
where its text comes from and how that is cut into train and three held-out parts."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import model_validator

from monolm.config.base import Fraction, NonNegInt, PositiveFloat, PositiveInt, Strict
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


class ContaminationConfig(Strict):
    """The near-duplicate check of stage 0 between train and every held-out part (each part is
    also checked against the held-out parts chosen before it: validation, then test, then attack)."""

    ngram: PositiveInt = 13  # words per n-gram (the GPT-3 contamination study's choice)
    # A held-out document is contaminated when more than this share of its word n-grams occurs in
    # the text it is checked against...
    max_ngram_overlap: Fraction = 0.1
    # ...or more than this share of its characters lies in paragraphs (of at least
    # min_paragraph_chars) that occur there verbatim (0: any duplicated paragraph).
    max_paragraph_overlap: Fraction = 0.0
    min_paragraph_chars: PositiveInt = 80
    # drop: leave contaminated documents out (and report how many); fail: stop stage 0.
    action: Literal["drop", "fail"] = "drop"


# Fields of an earlier layout of the data section, and what replaced them.
_RENAMED_DATA_FIELDS = {
    "eval_split": "data.val_split (checkpoint selection) and data.test_split (reported quality)",
    "n_eval_docs": "data.n_val_docs (checkpoint selection) and data.n_test_docs (reported quality)",
    "embedded_eval_fraction": "the document counts data.n_val_docs, data.n_test_docs and data.n_attack_docs",
    "embedded_attack_fraction": "the document counts data.n_val_docs, data.n_test_docs and data.n_attack_docs",
}
HELD_OUT_PARTS = ("validation", "test", "attack")


class DataConfig(Strict):
    """Where the text comes from and how it is cut into four parts: train, and three held-out
    parts that are pairwise disjoint and free of near-duplicates of train. validation selects
    the checkpoint (and draws the training curves), test is where reported quality is measured,
    attack is what stages 5-6 attack."""

    source: Literal["hub", "local", "embedded"] = "hub"
    # hub: a dataset id; local: a directory or file of jsonl/parquet in Pile format
    # ({"text": ..., "meta": {"pile_set_name": ...}}); embedded: ignored (stdlib documentation prose).
    dataset: str = "monology/pile-uncopyrighted"
    text_field: str = "text"
    # Split names (hub datasets and local directories; a single file or the embedded corpus is
    # carved per seed instead). Pythia was pre-trained on the Pile's train split, so held-out text
    # must never be later rows of the training stream. Held-out parts that name the same split are
    # drawn from it disjointly (validation first, then test, then attack).
    train_split: str = "train"
    val_split: str = "validation"
    test_split: str = "test"
    attack_split: str = "test"
    seq_len: PositiveInt = 2048
    n_train_docs: PositiveInt = 20000
    n_val_docs: PositiveInt = 200
    n_test_docs: PositiveInt = 500
    n_attack_docs: PositiveInt = 400
    min_doc_chars: NonNegInt = 200
    contamination: ContaminationConfig = ContaminationConfig()

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for old, new in _RENAMED_DATA_FIELDS.items():
                if old in data:
                    raise ValueError(f"data.{old}={data[old]!r}: this field was replaced by {new}")
        return data

    @model_validator(mode="after")
    def _held_out(self) -> DataConfig:
        for part in HELD_OUT_PARTS:
            field = self.split_field(part)
            if getattr(self, field) == self.train_split:
                raise ValueError(
                    f"data.{field}={getattr(self, field)!r} and data.train_split={self.train_split!r} point the "
                    f"{part} part and the train part at the same documents; held-out text must come from a "
                    "held-out split (e.g. 'validation' or 'test')"
                )
        return self

    @staticmethod
    def split_field(part: str) -> str:
        """The config field naming the split a part is drawn from."""
        return {"train": "train_split", "validation": "val_split", "test": "test_split", "attack": "attack_split"}[part]

    def part_size(self, part: str) -> int:
        """How many documents the part holds at most."""
        sizes = {
            "train": self.n_train_docs,
            "validation": self.n_val_docs,
            "test": self.n_test_docs,
            "attack": self.n_attack_docs,
        }
        return sizes[part]
