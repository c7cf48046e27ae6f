"""The token sequences the attacks build: which tokens an attack may use, the one-token context
every sequence starts with, and right-padded batches whose target masks say which tokens are
scored (`monolm.attacks.scoring` computes the objective over them).

**Candidate tokens** exclude special tokens, ids the tokenizer cannot produce (the unused rows
of a padded embedding matrix: Pythia has 50304 rows for a 50277-token tokenizer; holes in the
vocabulary) and, optionally, tokens that do not survive a decode/encode round trip. Attacks work
on token ids only and never re-encode a trigger.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


# --------------------------------------------------------------------------- vocabulary
def allowed_token_mask(
    tokenizer: Any,
    num_embeddings: int,
    *,
    require_roundtrip: bool = False,
    disallow: Sequence[int] = (),
) -> torch.Tensor:
    """Bool mask over the embedding rows: True where a token may be used by an attack.

    Excluded: ids >= len(tokenizer) (padded embedding rows no tokenizer output can reach), ids the
    tokenizer has no token for (vocabulary holes), every special id (`all_special_ids` and added
    tokens flagged special), `disallow`, and with `require_roundtrip` any id whose decoded text does
    not encode back to exactly that id (a stricter notion of "a token real text can contain").
    """
    n_tok = min(len(tokenizer), num_embeddings)
    mask = torch.zeros(num_embeddings, dtype=torch.bool)
    mask[:n_tok] = True
    tokens = tokenizer.convert_ids_to_tokens(list(range(n_tok)))
    for i, tok in enumerate(tokens):
        if tok is None:
            mask[i] = False
    special = set(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    for idx, added in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(added, "special", False):
            special.add(int(idx))
    for idx in list(special) + [int(i) for i in disallow]:
        if 0 <= idx < num_embeddings:
            mask[idx] = False
    if require_roundtrip:
        for i in torch.nonzero(mask).flatten().tolist():
            text = tokenizer.decode([i], clean_up_tokenization_spaces=False)
            if tokenizer.encode(text, add_special_tokens=False) != [i]:
                mask[i] = False
    if not mask.any():
        raise ValueError("no token is allowed as an attack candidate (check the tokenizer and `disallow`)")
    return mask


def checked_allowed_mask(model: nn.Module, tokenizer: Any, allowed: torch.Tensor | None) -> torch.Tensor:
    """An attack's vocabulary on the CPU: `allowed` (bool over the model's embedding rows), by
    default `allowed_token_mask(tokenizer, rows)`; a mask of another length is an error."""
    rows = model.get_input_embeddings().weight.shape[0]
    if allowed is None:
        allowed = allowed_token_mask(tokenizer, rows)
    if allowed.shape != (rows,):
        raise ValueError(f"allowed mask has shape {tuple(allowed.shape)}, the embedding has {rows} rows")
    return allowed.cpu()


def context_prefix(tokenizer: Any) -> list[int]:
    """The one-token context every attacked and clean sequence starts with.

    Like lm-evaluation-harness (and `monolm.evaluation.perplexity`), the first text token is predicted from
    the tokenizer's EOS token (Pythia's BOS/EOS). It is never a target and never modified. A
    tokenizer without EOS/BOS gives no prefix; the first text token then cannot be scored, in
    the clean and the attacked sequence alike, so both are always scored on the same tokens.
    """
    for attr in ("eos_token_id", "bos_token_id"):
        idx = getattr(tokenizer, attr, None)
        if isinstance(idx, int):
            return [idx]
    return []


# --------------------------------------------------------------------------- sequences
@dataclass
class TextBatch:
    """Right-padded sequences with their attention and target masks (all [N, T])."""

    input_ids: torch.Tensor  # long
    attention_mask: torch.Tensor  # long, 1 on real tokens
    target_mask: torch.Tensor  # bool, True where the token at t is scored (predicted from t-1)

    def to(self, device: torch.device | str) -> TextBatch:
        return TextBatch(self.input_ids.to(device), self.attention_mask.to(device), self.target_mask.to(device))

    def rows(self, index: torch.Tensor | slice, width: int | None = None) -> TextBatch:
        """The rows `index`, cut to their first `width` positions (all of them by default)."""
        cols = slice(None, width)
        return TextBatch(self.input_ids[index, cols], self.attention_mask[index, cols], self.target_mask[index, cols])


def pad_batch(sequences: Sequence[Sequence[int]], target_masks: Sequence[Sequence[bool]], pad_id: int = 0) -> TextBatch:
    """Right-pad `sequences`; padded positions are neither attended nor targets."""
    if len(sequences) != len(target_masks):
        raise ValueError("one target mask per sequence is required")
    width = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    am = torch.zeros((len(sequences), width), dtype=torch.long)
    tm = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, (seq, mask) in enumerate(zip(sequences, target_masks, strict=True)):
        if len(mask) != len(seq):
            raise ValueError(f"sequence {row}: target mask has {len(mask)} entries for {len(seq)} tokens")
        ids[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        am[row, : len(seq)] = 1
        tm[row, : len(seq)] = torch.as_tensor(list(mask), dtype=torch.bool)
    return TextBatch(ids, am, tm)


def text_target_mask(n_context: int, n_text: int, *, has_prefix: bool) -> list[bool]:
    """Target mask of `context + text`, where the context is the prefix plus any trigger: every
    text token is a target, except the first one when there is no prefix. That token has no
    predictor in the clean sequence, so it is left out of the attacked one too, keeping clean and
    attacked losses on exactly the same tokens."""
    return [False] * n_context + [has_prefix or j > 0 for j in range(n_text)]


def truncate(texts: Sequence[Sequence[int]], max_tokens: int) -> list[list[int]]:
    return [list(t)[:max_tokens] for t in texts]


def check_texts(texts: Sequence[Sequence[int]], prefix: Sequence[int], what: str) -> None:
    """Every text must leave at least one scored token (two tokens when there is no prefix)."""
    need = 1 if prefix else 2
    for i, text in enumerate(texts):
        if len(text) < need:
            raise ValueError(f"{what}[{i}] has {len(text)} tokens; at least {need} are needed to score it")
