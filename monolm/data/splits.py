"""Documents, splits, tokenizers and training blocks.

Four parts per seed: `train`, and three held-out parts, pairwise disjoint and free of
near-duplicates of train (`monolm.data.contamination`): `validation` selects the checkpoint and draws
the training curves, `test` is where reported quality is measured, `attack` is what the attacks
use. Selection and reporting never share a document.

Three sources, one interface (`load_splits`):
- `hub`: a Hugging Face dataset streamed with `datasets` (default: the uncopyrighted Pile).
  Training text comes from `train_split`; held-out parts from the dataset's held-out splits
  (the Pile: validation from its validation split, test and attack from its test split). Pythia
  was pre-trained on the Pile's train split, so later rows of the training stream are *not* held
  out (the original study evaluated on rows its model had seen).
- `local`: jsonl/parquet files in Pile format (`{"text": ..., "meta": {"pile_set_name": ...}}`),
  either a directory holding `<split>.jsonl`/`<split>.parquet` (or `<split>/*.jsonl`), used like
  the hub's named splits, or a single file, carved into the four parts per seed.
- `embedded`: real English prose that ships with Python (`pydoc_data.topics`, ~465 KB of
  documentation), paragraphs de-duplicated across the corpus and cut into paragraph-group
  documents, carved into the four parts per seed. No network, nothing copied into the repo.

Held-out parts that name the same split are drawn from it one after the other, so they never
share a document. Every held-out candidate is checked against train and the held-out parts
chosen before it; contaminated ones are dropped (or stage 0 fails, as configured), and the
measured counts and rates come back with the splits (`prepare_splits`).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from monolm.config import DataConfig
from monolm.core.artifacts import atomic_path
from monolm.core.errors import PermanentError
from monolm.core.runtime import derive_seed
from monolm.data.contamination import ContaminationError, Index, doc_hash, select_clean

log = logging.getLogger("monolm.data")

EOS_TOKEN = "<|endoftext|>"  # Pythia's only special token: BOS, EOS and UNK at once
PAD_TOKEN = "<|padding|>"  # Pythia's tokenizer has it as id 1
PARTS = ("train", "validation", "test", "attack")
HELD_OUT = PARTS[1:]
# What each held-out part is used for (reports and verification.json say it in these words).
PART_USE = {
    "validation": "checkpoint selection and training curves (stages 2-3), function drift (stage 1)",
    "test": "reported quality (stage 4)",
    "attack": "attacks (stages 5-6)",
}


class DataError(PermanentError, ValueError):
    """Data that cannot be used: missing, empty, too short, not UTF-8, overlapping splits."""


@dataclass
class Splits:
    train: list[str]
    validation: list[str]
    test: list[str]
    attack: list[str]

    def as_dict(self) -> dict[str, list[str]]:
        return {part: getattr(self, part) for part in PARTS}


# --------------------------------------------------------------------------- embedded corpus
def embedded_documents(max_chars: int = 1500, min_chars: int = 200) -> list[str]:
    """Python's own documentation prose as a list of documents of a few paragraphs each.

    Several topics repeat each other's paragraphs (`specialnames` holds most of
    `attribute-access`): a paragraph is kept only where it first occurs (topics in name order),
    so no paragraph appears in two documents and a carve cannot put one on both sides."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    docs: list[str] = []
    for key in sorted(topics):
        current: list[str] = []
        size = 0
        for para in topics[key].split("\n\n"):
            para = para.strip()
            normalized = " ".join(para.split())
            if not para or normalized in seen:
                continue
            seen.add(normalized)
            if current and size + len(para) > max_chars:
                docs.append("\n\n".join(current))
                current, size = [], 0
            current.append(para)
            size += len(para) + 2
        if current:
            docs.append("\n\n".join(current))
    return [d for d in docs if len(d) >= min_chars]


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


def _usable(texts: Iterable[str], cfg: DataConfig) -> Iterator[str]:
    """Documents long enough to use, each once (first occurrence kept)."""
    seen: set[str] = set()
    for text in texts:
        if len(text) >= cfg.min_doc_chars:
            key = doc_hash(text)
            if key not in seen:
                seen.add(key)
                yield text


def _take(texts: Iterable[str], n: int) -> list[str]:
    out: list[str] = []
    for text in texts:
        if len(out) >= n:
            break
        out.append(text)
    return out


def _carve(docs: list[str], cfg: DataConfig, seed: int) -> tuple[list[str], dict[str, list[str]]]:
    """One pool of documents cut into train and held-out candidates, shuffled per seed: the
    held-out parts take their configured counts, train the rest (at most data.n_train_docs)."""
    docs = list(_usable(docs, cfg))
    random.Random(derive_seed(seed, "splits")).shuffle(docs)
    held = sum(cfg.part_size(part) for part in HELD_OUT)
    if len(docs) < 2 * held:
        raise DataError(
            f"corpus too small: {len(docs)} documents of >= {cfg.min_doc_chars} characters (data.min_doc_chars); "
            f"data.n_val_docs + data.n_test_docs + data.n_attack_docs = {held} held-out documents must "
            "leave at least as many for training (lower the held-out counts or use more text)"
        )
    pools: dict[str, list[str]] = {}
    start = 0
    for part in HELD_OUT:
        pools[part] = docs[start : start + cfg.part_size(part)]
        start += cfg.part_size(part)
    return docs[start:][: cfg.n_train_docs], pools


def _local_split(root: Path, split: str, cfg: DataConfig, seed: int) -> list[str]:
    files = _local_split_files(root, split)
    if not files:
        raise DataError(
            f"data.dataset={cfg.dataset!r}: no {split}.jsonl, {split}.parquet or {split}/*.jsonl for split {split!r}"
        )
    docs = list(_usable(_iter_local(files, cfg.text_field), cfg))
    random.Random(derive_seed(seed, "splits", split)).shuffle(docs)
    return docs


def _named_splits(cfg: DataConfig, seed: int, cache_dir: Path | None) -> tuple[list[str], dict[str, Iterator[str]]]:
    """Train documents and one candidate stream per held-out part from named splits (a local
    directory or a hub dataset); parts naming the same split share its stream, so they are drawn
    from it one after the other."""
    root = Path(cfg.dataset)

    def stream(split: str) -> Iterator[str]:
        if cfg.source == "local":
            return iter(_local_split(root, split, cfg, seed))
        return _usable(_iter_hub(cfg, split, cache_dir, seed), cfg)

    train = _take(stream(cfg.train_split), cfg.n_train_docs)
    streams: dict[str, Iterator[str]] = {}
    pools = {}
    for part in HELD_OUT:
        split = getattr(cfg, cfg.split_field(part))
        if split not in streams:
            streams[split] = stream(split)
        pools[part] = streams[split]
    return train, pools


def prepare_splits(cfg: DataConfig, seed: int, cache_dir: Path | None = None) -> tuple[Splits, dict[str, Any]]:
    """The four parts for one seed from the configured source, and what the contamination check
    measured on the held-out candidates (per part: candidates, exact duplicates, contaminated,
    kept, rates), for verification.json."""
    if cfg.source == "local" and not Path(cfg.dataset).exists():
        raise DataError(f"data.dataset={cfg.dataset!r}: no such file or directory")
    if cfg.source == "embedded":
        train, pools = _carve(embedded_documents(min_chars=cfg.min_doc_chars), cfg, seed)
        how = "carved per seed from the embedded corpus (paragraphs de-duplicated across the corpus)"
    elif cfg.source == "local" and Path(cfg.dataset).is_file():
        train, pools = _carve(list(_iter_local([Path(cfg.dataset)], cfg.text_field)), cfg, seed)
        how = f"carved per seed from {cfg.dataset}"
    else:
        train, pools = _named_splits(cfg, seed, cache_dir)
        how = "named splits: " + ", ".join(f"{p} from {getattr(cfg, cfg.split_field(p))!r}" for p in PARTS)
    if not train:
        raise DataError("the train part is empty (after dropping documents shorter than data.min_doc_chars)")
    index = Index(cfg.contamination)
    index.add(train)
    used = {doc_hash(t) for t in train}
    parts: dict[str, list[str]] = {"train": train}
    checks: dict[str, Any] = {}
    for part in HELD_OUT:
        wanted = cfg.part_size(part)
        try:
            kept, check = select_clean(part, pools[part], wanted, index, used, list(parts))
        except ContaminationError as exc:
            raise DataError(str(exc)) from None
        if not kept:
            raise DataError(
                f"the {part} part is empty: {check.candidates} candidates, {check.contaminated} contaminated, "
                f"{check.exact_duplicates} already used (documents shorter than data.min_doc_chars are not candidates)"
            )
        log.info(
            "%s part: %d of %d requested documents (of %d candidates, %d contaminated, %d already used: left out)",
            part,
            len(kept),
            wanted,
            check.candidates,
            check.contaminated,
            check.exact_duplicates,
        )
        index.add(kept)
        parts[part] = kept
        checks[part] = {**check.to_json(), "requested": wanted, "use": PART_USE[part]}
    report = {"source": how, "settings": cfg.contamination.model_dump(mode="json"), "parts": checks}
    return Splits(**parts), report


def load_splits(cfg: DataConfig, seed: int, cache_dir: Path | None = None) -> Splits:
    """The train/validation/test/attack documents for one seed, from the configured source."""
    return prepare_splits(cfg, seed, cache_dir)[0]


def save_splits(splits: Splits, directory: Path) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for name, docs in splits.as_dict().items():
        write_jsonl_texts(directory / f"{name}.jsonl", docs)
        names.append(f"{name}.jsonl")
    return names


def load_saved_splits(directory: Path) -> Splits:
    return Splits(**{name: read_jsonl_texts(directory / f"{name}.jsonl") for name in PARTS})


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
