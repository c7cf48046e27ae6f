"""Held-out perplexity, computed the way lm-evaluation-harness computes `loglikelihood_rolling`.

Why mirror lm-eval exactly: the paper compares against published Pythia numbers, which come from
lm-eval. Small choices (is the first token scored? do windows overlap? which tokens carry the
loss?) move perplexity by several percent, more than the effect we are measuring. So:

* Each document is tokenized whole by the caller (no truncation, no special tokens added).
* The first token is predicted from a one-token prefix, `prefix_token_id` (lm-eval uses the
  tokenizer's EOS token, which for Pythia is also its BOS). So every token of the document is
  predicted exactly once and `tokens == sum(len(doc) for doc in docs)`.
* The document is cut like lm-eval's `get_rolling_token_windows(..., context_len=1)` followed by
  `make_disjoint_window`: the predicted spans are disjoint blocks of `seq_len` tokens. The first
  window's input is `[prefix] + doc[:n-1]`. Every later window's input is the `seq_len` tokens
  ending just before its last target, so a short final block is scored with the preceding
  tokens as (unscored) context, exactly as lm-eval does. Inputs never exceed `seq_len` tokens.
* Only predicted tokens count; the loss is summed in float64 and the metrics are token-, word- or
  byte-weighted over the whole set (lm-eval's `weighted_perplexity`/`bits_per_byte`), not a mean
  of per-document perplexities.

Batching sorts windows by length (longest first, so an out-of-memory error shows up in the first
batch) and pads on the right. With a causal model, right padding cannot change the logits of the
real positions, and padded positions carry no label, so the batched result equals the
one-window-at-a-time result (tested to 1e-5).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Required, TypedDict, Unpack

import torch
from torch import nn
from tqdm.auto import tqdm

from monolm.core.cross_entropy import CPU_TOKENS_PER_FORWARD, cross_entropy_fp32
from monolm.core.deadline import check_deadline
from monolm.core.runtime import Bf16, autocast, bf16_enabled, eval_mode, is_oom, model_device, pick_device

log = logging.getLogger("monolm.evaluation")
ModelOrLoader = nn.Module | Callable[[], nn.Module]


@dataclass(frozen=True)
class Window:
    """One model input. The logits at the last `len(targets)` positions of `input_ids` predict
    `targets` (position j predicts the token that follows `input_ids[j]`)."""

    doc_index: int
    input_ids: tuple[int, ...]
    targets: tuple[int, ...]


def rolling_windows(tokens: Sequence[int], *, prefix_token_id: int, seq_len: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's `get_rolling_token_windows(tokens, prefix, seq_len, context_len=1)` made
    disjoint: a list of `(input_ids, targets)`; targets partition `tokens` in order.

    For `range(34)`, `seq_len=10` this yields inputs `[P,0..8]`, `[9..18]`, `[19..28]`, `[23..32]`
    predicting `[0..9]`, `[10..19]`, `[20..29]`, `[30..33]` (lm-eval's own test case).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    tokens = list(tokens)
    n = len(tokens)
    if n == 0:
        return []
    first = min(seq_len, n)
    windows = [([prefix_token_id, *tokens[: first - 1]], tokens[:first])]
    done = first
    while done < n:
        n_pred = min(seq_len, n - done)
        end = done + n_pred
        # seq_len inputs ending one before the last target; done >= seq_len so start >= 0
        windows.append((tokens[end - seq_len - 1 : end - 1], tokens[done:end]))
        done = end
    return windows


def count_words(text: str) -> int:
    """lm-eval's word count for perplexity tasks: `len(re.split(r"\\s+", text))` (kept verbatim,
    leading/trailing whitespace included, so word perplexities are comparable)."""
    return len(re.split(r"\s+", text))


def _max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None)


# Model types whose causal-LM head is a plain linear map of the base model's last hidden state
# (no logit scaling or soft-capping): their head is applied to the scored positions only.
PLAIN_HEAD_TYPES = frozenset({"gpt_neox", "llama", "mistral", "qwen2", "gpt2", "gptj", "opt"})


@dataclass(frozen=True)
class Batch:
    """A right-padded batch and where its scored positions are: `rows[k]`, `cols[k]` is the
    position whose next-token prediction is `targets[k]`."""

    input_ids: torch.Tensor  # [B, W]
    rows: torch.Tensor  # [n] long
    cols: torch.Tensor  # [n] long
    targets: torch.Tensor  # [n] long


def _make_batch(windows: Sequence[Window], *, pad_token_id: int, pad_to: int | None, device: torch.device) -> Batch:
    """Right-padded `input_ids` and the flat (row, column, target) index of every scored
    position, each built with one tensor call and moved to the device once."""
    width = max(len(w.input_ids) for w in windows)
    if pad_to is not None:
        if pad_to < width:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest window ({width})")
        width = pad_to
    ids = [[*w.input_ids, *([pad_token_id] * (width - len(w.input_ids)))] for w in windows]
    rows: list[int] = []
    cols: list[int] = []
    targets: list[int] = []
    for row, w in enumerate(windows):
        m, p = len(w.input_ids), len(w.targets)
        rows.extend([row] * p)
        cols.extend(range(m - p, m))
        targets.extend(w.targets)
    index = torch.tensor([rows, cols, targets], dtype=torch.long)
    return Batch(torch.tensor(ids, dtype=torch.long).to(device), *index.to(device))


def _scored_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Logits [n, V] at the scored positions only. No attention mask: the padding is on the right,
    so with a causal model it lies in every real position's future and cannot change its logits,
    and the unmasked causal attention is the fast path. For a plain linear head the head runs on
    the scored positions only (not on padding or unscored context)."""
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if getattr(config, "model_type", None) in PLAIN_HEAD_TYPES and isinstance(head, nn.Linear):
        hidden = model.base_model(input_ids=batch.input_ids, use_cache=False).last_hidden_state
        return head(hidden[batch.rows, batch.cols])
    logits = model(input_ids=batch.input_ids, use_cache=False).logits
    return logits[batch.rows, batch.cols]


@torch.inference_mode()
def score_windows(
    model: nn.Module,
    windows: Sequence[Window],
    *,
    device: torch.device,
    bf16: bool = False,
    pad_token_id: int = 0,
    pad_to: int | None = None,
) -> list[float]:
    """Summed negative log-likelihood (nats, float64) of each window's targets, in one forward
    pass and one transfer to the host. `pad_to` exists so tests can show that the padding width
    does not matter."""
    batch = _make_batch(windows, pad_token_id=pad_token_id, pad_to=pad_to, device=device)
    with autocast(device, bf16):
        logits = _scored_logits(model, batch)
    nll = cross_entropy_fp32(logits, batch.targets)
    sums = torch.zeros(len(windows), dtype=torch.float64, device=nll.device)
    sums.index_add_(0, batch.rows, nll.double())
    return sums.tolist()


def doc_nll(
    model: nn.Module,
    docs: Sequence[Sequence[int]],
    *,
    seq_len: int,
    batch_size: int,
    prefix_token_id: int,
    device: torch.device | str | None = None,
    bf16: Bf16 = "auto",
    progress: bool = True,
) -> tuple[list[float], list[int]]:
    """Per-document summed NLL (nats) and number of predicted tokens.

    The model is moved to `device` if given (default: where its parameters already are), put in
    eval mode for the duration and restored afterwards. On an out-of-memory error the batch size
    is halved and the batch retried (down to 1), so a too-large `batch_size` costs time, not a run.
    bf16 autocast is used on CUDA only (`runtime.bf16_enabled(..., cuda_only=True)`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    max_pos = _max_positions(model)
    if max_pos is not None and seq_len > max_pos:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_position_embeddings={max_pos}")
    device = torch.device(device) if device is not None else model_device(model)
    if model_device(model) != device:
        model.to(device)
    windows = [
        Window(i, tuple(inp), tuple(tgt))
        for i, doc in enumerate(docs)
        for inp, tgt in rolling_windows(doc, prefix_token_id=prefix_token_id, seq_len=seq_len)
    ]
    # longest first (stable): similar lengths share a batch, and OOM shows up immediately
    windows.sort(key=lambda w: -len(w.input_ids))
    nll = [0.0] * len(docs)
    counts = [0] * len(docs)
    with eval_mode(model):
        bar = tqdm(total=len(windows), desc="perplexity", unit="win", disable=None if progress else True)
        for batch, sums in _scored_batches(
            model,
            windows,
            batch_size,
            device=device,
            bf16=bf16_enabled(bf16, device, cuda_only=True),
            pad_token_id=prefix_token_id,
        ):
            check_deadline("between evaluation batches")
            for w, s in zip(batch, sums, strict=True):
                nll[w.doc_index] += s
                counts[w.doc_index] += len(w.targets)
            bar.update(len(batch))
        bar.close()
    return nll, counts


def _scored_batches(
    model: nn.Module,
    windows: Sequence[Window],
    batch_size: int,
    *,
    device: torch.device,
    bf16: bool,
    pad_token_id: int,
) -> Iterator[tuple[Sequence[Window], list[float]]]:
    """`(batch, summed NLL per window)` over consecutive batches of `windows`; a batch that runs
    out of memory is retried at half its size, and later batches keep the smaller size. On the
    CPU a batch holds at most `CPU_TOKENS_PER_FORWARD` tokens (its longest window sets the width)."""
    start, size = 0, batch_size
    budget = CPU_TOKENS_PER_FORWARD if device.type == "cpu" else None
    while start < len(windows):
        rows = size if budget is None else min(size, max(1, budget // len(windows[start].input_ids)))
        batch = windows[start : start + rows]
        try:
            sums = score_windows(model, batch, device=device, bf16=bf16, pad_token_id=pad_token_id)
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError
            if not is_oom(exc) or len(batch) == 1:
                raise
            size = max(1, len(batch) // 2)
            log.warning("evaluation: out of memory; retrying with batch size %d", size)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        yield batch, sums
        start += len(batch)


def perplexity(
    model: nn.Module,
    docs: list[list[int]],
    *,
    seq_len: int,
    batch_size: int,
    prefix_token_id: int,
    texts: list[str] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    bf16: Bf16 = "auto",
    return_per_doc: bool = False,
) -> dict[str, Any]:
    """Token-weighted perplexity of `model` on held-out `docs` (token id lists), lm-eval style.

    Returns `token_perplexity` (= exp(loss)), `loss` (mean nats per predicted token), `tokens`,
    `docs`, and, when the documents' `texts` are given (needed for byte and word counts),
    lm-eval's `word_perplexity`, `byte_perplexity` and `bits_per_byte` (UTF-8 bytes). With
    `return_per_doc`, also `per_doc`: `[{"nll": nats, "tokens": n}, ...]` for paired tests across
    documents.
    """
    if texts is not None and len(texts) != len(docs):
        raise ValueError(f"texts has {len(texts)} entries but docs has {len(docs)}")
    nll, counts = doc_nll(
        model,
        docs,
        seq_len=seq_len,
        batch_size=batch_size,
        prefix_token_id=prefix_token_id,
        device=device,
        bf16=bf16,
        progress=progress,
    )
    total_tokens = sum(counts)
    if total_tokens == 0:
        raise ValueError("perplexity: no tokens to predict (all documents are empty)")
    total_nll = math.fsum(nll)
    loss = total_nll / total_tokens
    out: dict[str, Any] = {}
    if texts is not None:
        words = sum(count_words(t) for t in texts)
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        out["word_perplexity"] = math.exp(total_nll / words)
        out["byte_perplexity"] = math.exp(total_nll / n_bytes)
        out["bits_per_byte"] = total_nll / n_bytes / math.log(2)
    out.update(token_perplexity=math.exp(loss), loss=loss, tokens=total_tokens, docs=len(docs))
    if return_per_doc:
        out["per_doc"] = [{"nll": s, "tokens": c} for s, c in zip(nll, counts, strict=True)]
    return out


class PerplexityOptions(TypedDict, total=False):
    """`perplexity`'s settings besides the model, documents and device, which `evaluate_models`
    applies to every model."""

    seq_len: Required[int]
    batch_size: Required[int]
    prefix_token_id: Required[int]
    texts: list[str] | None
    progress: bool
    bf16: Bf16
    return_per_doc: bool


def evaluate_models(
    models: Mapping[str, ModelOrLoader],
    docs: list[list[int]],
    *,
    device: torch.device | str | None = None,
    **options: Unpack[PerplexityOptions],
) -> dict[str, dict[str, Any]]:
    """Evaluate several models (base, baseline, monotonic) on the very same documents.

    Values are either modules or zero-argument loaders (e.g. `functools.partial(load_model,
    path)`). A loader's model is built only when its turn comes, moved to `device` (default
    `pick_device()`) and released afterwards, so only one large model is in memory at a time.
    A module is evaluated where it is unless `device` is given.
    """
    results: dict[str, dict[str, Any]] = {}
    for name, entry in models.items():
        loaded = not isinstance(entry, nn.Module)
        model = entry() if loaded else entry
        if not isinstance(model, nn.Module):
            raise TypeError(f"evaluate_models: {name!r} is neither an nn.Module nor a loader returning one")
        target = device if device is not None else (pick_device() if loaded else None)
        try:
            results[name] = perplexity(model, docs, device=target, **options)
        finally:
            if loaded:
                del model
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        log.info(
            "evaluation: %s loss=%.4f token_perplexity=%.3f over %d tokens",
            name,
            results[name]["loss"],
            results[name]["token_perplexity"],
            results[name]["tokens"],
        )
    return results
