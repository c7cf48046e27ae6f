"""Documents, splits, tokenizers and training blocks.

Three sources, one interface (`load_splits`):
- `hub`: a Hugging Face dataset streamed with `datasets` (default: the uncopyrighted Pile).
  Training text comes from `train_split`; evaluation and attack text from the dataset's held-out
  splits. Pythia was pre-trained on the Pile's train split, so later rows of the training stream
  are *not* held out (the original study evaluated on rows its model had seen).
- `local`: jsonl/parquet files in Pile format (`{"text": ..., "meta": {"pile_set_name": ...}}`),
  either a directory holding `<split>.jsonl`/`<split>.parquet` (or `<split>/*.jsonl`) or a single
  file (then all splits are carved from it, disjointly, per seed).
- `embedded`: real English prose that ships with Python (`pydoc_data.topics`, ~465 KB of
  documentation), cut into paragraph-group documents. No network, nothing copied into the repo.

Splits are deterministic per seed and disjoint (checked by content hash, not trusted).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from monolm.artifacts import atomic_path
from monolm.config import DataConfig
from monolm.runtime import derive_seed

log = logging.getLogger("monolm.data")

EOS_TOKEN = "<|endoftext|>"  # Pythia's only special token: BOS, EOS and UNK at once
PAD_TOKEN = "<|padding|>"  # Pythia's tokenizer has it as id 1
SPLITS = ("train", "eval", "attack")


class DataError(ValueError):
    """Data that cannot be used: missing, empty, too short, not UTF-8, overlapping splits."""


@dataclass
class Splits:
    train: list[str]
    eval: list[str]
    attack: list[str]

    def as_dict(self) -> dict[str, list[str]]:
        return {"train": self.train, "eval": self.eval, "attack": self.attack}


# --------------------------------------------------------------------------- embedded corpus
def embedded_documents(max_chars: int = 1500, min_chars: int = 200) -> list[str]:
    """Python's own documentation prose as a list of documents of a few paragraphs each."""
    from pydoc_data.topics import topics

    docs: list[str] = []
    for key in sorted(topics):
        current: list[str] = []
        size = 0
        for para in topics[key].split("\n\n"):
            para = para.strip()
            if not para:
                continue
            if current and size + len(para) > max_chars:
                docs.append("\n\n".join(current))
                current, size = [], 0
            current.append(para)
            size += len(para) + 2
        if current:
            docs.append("\n\n".join(current))
    return list(dict.fromkeys(d for d in docs if len(d) >= min_chars))  # some topics repeat text


# --------------------------------------------------------------------------- local and hub
def _pile_text(row: dict[str, Any], text_field: str, where: str) -> str:
    if text_field not in row:
        raise DataError(
            f"{where}: row has no field {text_field!r} (fields: {sorted(row)}); "
            'expected Pile format {"text": ..., "meta": {...}}'
        )
    text = row[text_field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {text_field!r} is {type(text).__name__}, not text")
    return text


def read_jsonl_texts(path: str | Path, text_field: str = "text") -> list[str]:
    """Read a Pile-format jsonl file strictly: bad UTF-8 or bad JSON is an error naming the line."""
    path = Path(path)
    texts = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            texts.append(_pile_text(row, text_field, f"{path}:{lineno}"))
    return texts


def write_jsonl_texts(path: str | Path, texts: Iterable[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for text in texts:
            fh.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


def _local_split_files(root: Path, split: str) -> list[Path]:
    candidates = [root / f"{split}.jsonl", root / f"{split}.parquet"]
    found = [p for p in candidates if p.is_file()]
    if (root / split).is_dir():
        found += sorted((root / split).glob("*.jsonl")) + sorted((root / split).glob("*.parquet"))
    return found


def _iter_local(files: list[Path], text_field: str) -> Iterator[str]:
    for file in files:
        if file.suffix == ".jsonl":
            yield from read_jsonl_texts(file, text_field)
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(file, columns=[text_field])
            for i, text in enumerate(table.column(text_field).to_pylist()):
                yield _pile_text({text_field: text}, text_field, f"{file}[{i}]")


def _iter_hub(cfg: DataConfig, split: str, cache_dir: Path | None, seed: int) -> Iterator[str]:
    """Stream a hub dataset split. Shuffled with a seeded buffer so each seed sees its own sample."""
    import datasets

    ds = datasets.load_dataset(
        cfg.dataset, split=split, streaming=True, cache_dir=str(cache_dir) if cache_dir else None
    )
    ds = ds.shuffle(seed=derive_seed(seed, "data", split) % (1 << 32), buffer_size=10_000)
    for i, row in enumerate(ds):
        yield _pile_text(row, cfg.text_field, f"{cfg.dataset}[{split}][{i}]")


def _take(texts: Iterable[str], n: int, min_chars: int) -> list[str]:
    out: list[str] = []
    for text in texts:
        if len(text) >= min_chars:
            out.append(text)
            if len(out) >= n:
                break
    return out


def _carve(docs: list[str], cfg: DataConfig, seed: int) -> Splits:
    """Split one pool of documents into disjoint train/eval/attack parts, shuffled per seed."""
    docs = list(dict.fromkeys(d for d in docs if len(d) >= cfg.min_doc_chars))  # dedupe, keep order
    random.Random(derive_seed(seed, "splits")).shuffle(docs)
    n_eval = max(1, round(len(docs) * cfg.embedded_eval_fraction))
    n_attack = max(1, round(len(docs) * cfg.embedded_attack_fraction))
    if len(docs) < n_eval + n_attack + 2:
        raise DataError(
            f"corpus too small: {len(docs)} documents of >= {cfg.min_doc_chars} characters; "
            "need at least a few for each of train, eval and attack"
        )
    ev, at, tr = docs[:n_eval], docs[n_eval : n_eval + n_attack], docs[n_eval + n_attack :]
    return Splits(train=tr[: cfg.n_train_docs], eval=ev[: cfg.n_eval_docs], attack=at[: cfg.n_attack_docs])


def load_splits(cfg: DataConfig, seed: int, cache_dir: Path | None = None) -> Splits:
    """The train/eval/attack documents for one seed, from the configured source."""
    if cfg.source == "embedded":
        splits = _carve(embedded_documents(min_chars=cfg.min_doc_chars), cfg, seed)
    elif cfg.source == "local":
        root = Path(cfg.dataset)
        if not root.exists():
            raise DataError(f"data.dataset={cfg.dataset!r}: no such file or directory")
        if root.is_file():
            splits = _carve(list(_iter_local([root], cfg.text_field)), cfg, seed)
        else:
            parts = {}
            for name, split in (("train", cfg.train_split), ("eval", cfg.eval_split), ("attack", cfg.attack_split)):
                files = _local_split_files(root, split)
                if not files:
                    raise DataError(
                        f"data.dataset={cfg.dataset!r}: no {split}.jsonl, {split}.parquet or "
                        f"{split}/*.jsonl for split {split!r}"
                    )
                parts[name] = list(_iter_local(files, cfg.text_field))
            splits = _from_named_splits(parts, cfg, seed)
    else:
        parts = {
            name: _take(
                _iter_hub(cfg, split, cache_dir, seed),
                n + (cfg.n_attack_docs if name == "eval" else 0),
                cfg.min_doc_chars,
            )
            for name, split, n in (
                ("train", cfg.train_split, cfg.n_train_docs),
                ("eval", cfg.eval_split, cfg.n_eval_docs),
                ("attack", cfg.attack_split, cfg.n_attack_docs),
            )
        }
        splits = _from_named_splits(parts, cfg, seed, shuffled=True)
    check_splits(splits)
    return splits


def _from_named_splits(parts: dict[str, list[str]], cfg: DataConfig, seed: int, shuffled: bool = False) -> Splits:
    rng = random.Random(derive_seed(seed, "splits"))
    out = {}
    for name in ("train", "eval", "attack"):
        docs = list(dict.fromkeys(d for d in parts[name] if len(d) >= cfg.min_doc_chars))
        if not shuffled:
            rng.shuffle(docs)
        out[name] = docs
    if cfg.eval_split == cfg.attack_split:  # one held-out split serves both: carve it disjointly
        pool = out["eval"]
        out["eval"], out["attack"] = pool[: cfg.n_eval_docs], pool[cfg.n_eval_docs :]
    splits = Splits(
        train=out["train"][: cfg.n_train_docs],
        eval=out["eval"][: cfg.n_eval_docs],
        attack=out["attack"][: cfg.n_attack_docs],
    )
    # A held-out split can still contain a document that also appears in train (duplicates are
    # common in web corpora): drop it from the held-out side rather than trust the split names.
    train_hashes = {_hash(t) for t in splits.train}
    for name in ("eval", "attack"):
        kept = [t for t in getattr(splits, name) if _hash(t) not in train_hashes]
        if len(kept) < len(getattr(splits, name)):
            log.warning(
                "dropped %d %s documents that also occur in train", len(getattr(splits, name)) - len(kept), name
            )
        setattr(splits, name, kept)
    attack_only = {_hash(t) for t in splits.eval}
    splits.attack = [t for t in splits.attack if _hash(t) not in attack_only]
    return splits


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_splits(splits: Splits) -> None:
    """Every split non-empty and no document shared between any two splits."""
    for name, docs in splits.as_dict().items():
        if not docs:
            raise DataError(f"the {name} split is empty (after dropping documents shorter than data.min_doc_chars)")
    hashes = {name: {_hash(t) for t in docs} for name, docs in splits.as_dict().items()}
    for a, b in (("train", "eval"), ("train", "attack"), ("eval", "attack")):
        shared = hashes[a] & hashes[b]
        if shared:
            raise DataError(f"splits {a} and {b} share {len(shared)} documents; held-out data must be disjoint")


def save_splits(splits: Splits, directory: Path) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for name, docs in splits.as_dict().items():
        write_jsonl_texts(directory / f"{name}.jsonl", docs)
        names.append(f"{name}.jsonl")
    return names


def load_saved_splits(directory: Path) -> Splits:
    return Splits(**{name: read_jsonl_texts(directory / f"{name}.jsonl") for name in SPLITS})


# --------------------------------------------------------------------------- tokenizers and blocks
def train_bpe_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer like Pythia's (GPT-NeoX): `<|endoftext|>` is BOS/EOS/UNK."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )


def tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids per document, without special tokens (callers add EOS/prefix where they need)."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def pack_blocks(docs: list[list[int]], seq_len: int, eos_id: int) -> torch.Tensor:
    """Concatenate documents separated by EOS and cut into full blocks of `seq_len` tokens (the
    ragged tail is dropped). Training only: evaluation keeps documents whole."""
    stream: list[int] = []
    for ids in docs:
        stream.extend(ids)
        stream.append(eos_id)
    n_blocks = len(stream) // seq_len
    if n_blocks == 0:
        raise DataError(
            f"training text too short: {len(stream)} tokens cannot fill one block of data.seq_len={seq_len}"
        )
    return torch.tensor(stream[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)
