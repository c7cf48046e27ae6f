"""Near-duplicate contamination between training text and held-out text.

Whole-document de-duplication misses the common case: a held-out document that shares a
paragraph, a quoted passage or a boilerplate block with a training document. A model scores such
text better because it has seen it, which flatters held-out quality and changes what an attack
starts from. Two measurements per held-out document, against an index of the text it must not
overlap:

- exact paragraphs: the share of the document's characters in paragraphs (blank-line separated,
  whitespace collapsed, at least `min_paragraph_chars` long) that occur verbatim in the index;
- long n-grams: the share of the document's word n-grams (lower-cased `\\w+` words, n = 13 by
  default, as in the GPT-3 contamination study) that occur in the index.

A document above either threshold is contaminated: it is dropped, or the stage fails
(`data.contamination.action`). N-grams are hashed to 64-bit integers (a polynomial over word ids,
modulo 2^64) and looked up in a sorted array, so an index of millions of n-grams stays small.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from monolm.config.schema import ContaminationConfig

_WORD = re.compile(r"\w+")
_SPACE = re.compile(r"\s+")
_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier of the polynomial hash
_MIX = np.uint64(0xBF58476D1CE4E5B9)


class ContaminationError(ValueError):
    """Held-out documents overlap the training text and `data.contamination.action` is 'fail'."""


def doc_hash(text: str) -> str:
    """The content hash that decides whether two documents are the same document."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, whitespace collapsed, empty ones left out."""
    out = (_SPACE.sub(" ", p).strip() for p in re.split(r"\n\s*\n", text))
    return [p for p in out if p]


def _paragraph_key(paragraph: str) -> bytes:
    return hashlib.blake2b(paragraph.encode("utf-8"), digest_size=16).digest()


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class Overlap:
    """How much of one document occurs in the index."""

    ngram_share: float  # share of the document's n-grams found in the index
    paragraph_share: float  # share of its (long) paragraph characters found verbatim
    duplicated_paragraphs: int
    n_ngrams: int

    def contaminated(self, cfg: ContaminationConfig) -> bool:
        return self.ngram_share > cfg.max_ngram_overlap or self.paragraph_share > cfg.max_paragraph_overlap


class Index:
    """Paragraph hashes and word n-gram hashes of a body of text (the training part, then each
    held-out part as it is chosen, so later parts are checked against everything before them)."""

    def __init__(self, cfg: ContaminationConfig):
        self.cfg = cfg
        self._vocab: dict[str, int] = {}
        self._paragraphs: set[bytes] = set()
        self._pending: list[np.ndarray] = []
        self._ngrams = np.empty(0, dtype=np.uint64)

    def _ids(self, text: str, grow: bool) -> np.ndarray:
        """Word ids of `text`; unknown words get -1 when the index must not grow (they cannot
        be part of an n-gram that the index holds)."""
        vocab = self._vocab
        if grow:
            ids = [vocab.setdefault(w, len(vocab)) for w in words(text)]
        else:
            ids = [vocab.get(w, -1) for w in words(text)]
        return np.asarray(ids, dtype=np.int64)

    def _hashes(self, ids: np.ndarray) -> np.ndarray:
        """One 64-bit hash per window of n consecutive word ids."""
        n = self.cfg.ngram
        count = len(ids) - n + 1
        if count <= 0:
            return np.empty(0, dtype=np.uint64)
        mixed = (ids.astype(np.uint64) + np.uint64(1)) * _MIX
        h = np.zeros(count, dtype=np.uint64)
        for k in range(n):
            h = h * _MULT + mixed[k : k + count]
        return h

    def add(self, texts: Iterable[str]) -> None:
        for text in texts:
            self._pending.append(self._hashes(self._ids(text, grow=True)))
            self._paragraphs.update(
                _paragraph_key(p) for p in paragraphs(text) if len(p) >= self.cfg.min_paragraph_chars
            )

    def _table(self) -> np.ndarray:
        if self._pending:
            self._ngrams = np.unique(np.concatenate([self._ngrams, *self._pending]))
            self._pending = []
        return self._ngrams

    def measure(self, text: str) -> Overlap:
        """How much of `text` occurs in the index."""
        ids = self._ids(text, grow=False)
        hashes = self._hashes(ids)
        table = self._table()
        hits = 0
        if len(hashes) and len(table):
            known = np.lib.stride_tricks.sliding_window_view(ids >= 0, self.cfg.ngram).all(axis=1)
            pos = np.searchsorted(table, hashes).clip(max=len(table) - 1)
            hits = int(((table[pos] == hashes) & known).sum())
        long_paras = [p for p in paragraphs(text) if len(p) >= self.cfg.min_paragraph_chars]
        dup = [p for p in long_paras if _paragraph_key(p) in self._paragraphs]
        para_chars = sum(len(p) for p in long_paras)
        return Overlap(
            ngram_share=hits / len(hashes) if len(hashes) else 0.0,
            paragraph_share=sum(len(p) for p in dup) / para_chars if para_chars else 0.0,
            duplicated_paragraphs=len(dup),
            n_ngrams=len(hashes),
        )


@dataclass
class PartCheck:
    """What the contamination check measured on one held-out part's candidate documents."""

    part: str
    checked_against: list[str]
    candidates: int = 0  # documents examined (after length filter and exact de-duplication)
    exact_duplicates: int = 0  # candidates skipped because the same document was already used
    contaminated: int = 0  # candidates above a threshold
    with_duplicated_paragraph: int = 0
    kept: int = 0
    ngram_overlaps: list[float] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "ngram_overlaps"}
        shares = np.asarray(self.ngram_overlaps or [0.0])
        out.update(
            contamination_rate=self.contaminated / self.candidates if self.candidates else 0.0,
            duplicated_paragraph_rate=self.with_duplicated_paragraph / self.candidates if self.candidates else 0.0,
            mean_ngram_overlap=float(shares.mean()),
            max_ngram_overlap=float(shares.max()),
        )
        return out


def select_clean(
    part: str,
    candidates: Iterable[str],
    n: int,
    index: Index,
    used: set[str],
    checked_against: Sequence[str],
) -> tuple[list[str], PartCheck]:
    """Up to `n` documents of `candidates`, in order, that are neither a document already used
    (`used`: content hashes, updated) nor contaminated with respect to `index`. With
    `action='fail'` a contaminated candidate fails the whole part (after measuring all of it)."""
    cfg = index.cfg
    check = PartCheck(part, list(checked_against))
    kept: list[str] = []
    worst: list[tuple[float, str]] = []
    for text in _until(candidates, lambda: len(kept) >= n):
        key = doc_hash(text)
        if key in used:
            check.exact_duplicates += 1
            continue
        check.candidates += 1
        overlap = index.measure(text)
        check.ngram_overlaps.append(overlap.ngram_share)
        check.with_duplicated_paragraph += overlap.duplicated_paragraphs > 0
        if overlap.contaminated(cfg):
            check.contaminated += 1
            worst.append((max(overlap.ngram_share, overlap.paragraph_share), text))
            continue
        used.add(key)
        kept.append(text)
    check.kept = len(kept)
    if worst and cfg.action == "fail":
        share, text = max(worst, key=lambda w: w[0])
        raise ContaminationError(
            f"{check.contaminated} of {check.candidates} {part} documents overlap "
            f"{' + '.join(checked_against)} above data.contamination thresholds "
            f"(max_ngram_overlap={cfg.max_ngram_overlap}, max_paragraph_overlap={cfg.max_paragraph_overlap}; "
            f"worst overlap {share:.0%}, starting {text[:80]!r}); data.contamination.action='fail'"
        )
    return kept, check


def _until(items: Iterable[str], done) -> Iterator[str]:
    for item in items:
        if done():
            return
        yield item


def verify_parts(parts: dict[str, list[str]], cfg: ContaminationConfig) -> dict[str, Any]:
    """Re-measure the final parts from scratch: documents shared by any two parts (content hash),
    and every held-out document's overlap with the training part. Returns the two checks as
    verification.json records them: what was measured, and the verdict computed from it."""
    hashes = {name: {doc_hash(t) for t in docs} for name, docs in parts.items()}
    names = list(parts)
    shared = {f"{a}/{b}": len(hashes[a] & hashes[b]) for i, a in enumerate(names) for b in names[i + 1 :]}
    index = Index(cfg)
    index.add(parts["train"])
    measured: dict[str, Any] = {}
    for name in names[1:]:
        overlaps = [index.measure(t) for t in parts[name]]
        measured[name] = {
            "docs": len(overlaps),
            "above_threshold": sum(o.contaminated(cfg) for o in overlaps),
            "with_duplicated_paragraph": sum(o.duplicated_paragraphs > 0 for o in overlaps),
            "max_ngram_overlap": max((o.ngram_share for o in overlaps), default=0.0),
            "max_paragraph_overlap": max((o.paragraph_share for o in overlaps), default=0.0),
        }
    above = {name: m["above_threshold"] for name, m in measured.items()}
    return {
        "splits_disjoint": {
            "ok": not any(shared.values()),
            "detail": "documents shared by two parts (content hash): "
            + ", ".join(f"{pair} {count}" for pair, count in shared.items()),
            "shared_documents": shared,
            "docs": {name: len(docs) for name, docs in parts.items()},
        },
        "held_out_vs_train": {
            "ok": not any(above.values()),
            "detail": f"held-out documents above the contamination thresholds with respect to train "
            f"({cfg.ngram}-gram share > {cfg.max_ngram_overlap} or duplicated-paragraph share > "
            f"{cfg.max_paragraph_overlap}): " + ", ".join(f"{name} {count}" for name, count in above.items()),
            "parts": measured,
        },
    }
