"""What a universal trigger may be: text an attacker can type. UAT and GCG share this threat model,
so their numbers compare.

Two knobs, in both `attacks.uat` and `attacks.gcg`: `allow_non_ascii` (off by default: only tokens
that decode to printable ASCII, as nanoGCG's `get_nonascii_toks`) and `filter_ids` (on by default:
a candidate trigger counts only if its decoded text encodes back to the same ids, so some string
produces it). Special tokens and unused embedding rows are never allowed (`allowed_token_mask`).
Without the filter, a search can settle on a token sequence no text produces (on the tiny demo,
UAT's `[471, 471, 471]` decodes to `>>>>>>>>>`, which the tokenizer encodes as other tokens) and
report an effect no attacker can deliver.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from monolm.attacks.sequences import checked_allowed_mask

Keep = Callable[[Sequence[int]], bool]


def ascii_mask(tokenizer: Any, rows: int) -> torch.Tensor:
    """True where a token decodes to printable ASCII (nanoGCG's `get_nonascii_toks`, inverted)."""
    mask = torch.zeros(rows, dtype=torch.bool)
    for i in range(min(rows, len(tokenizer))):
        text = tokenizer.decode([i])
        mask[i] = bool(text) and text.isascii() and text.isprintable()
    return mask


def trigger_vocabulary(
    model: nn.Module, tokenizer: Any, cfg: Any, allowed: torch.Tensor | None, section: str
) -> torch.Tensor:
    """A trigger attack's tokens: `checked_allowed_mask` (no special or unused rows), and printable
    ASCII only unless `cfg.allow_non_ascii`. `section` names the config section in the error."""
    mask = checked_allowed_mask(model, tokenizer, allowed)
    if not cfg.allow_non_ascii:
        mask = mask & ascii_mask(tokenizer, mask.shape[0])
    if not mask.any():
        raise ValueError(f"no token is allowed for the attack (check {section}.allow_non_ascii and the tokenizer)")
    return mask


def survives_roundtrip(tokenizer: Any) -> Keep:
    """Whether a trigger's decoded text encodes back to exactly its ids."""

    def check(ids: Sequence[int]) -> bool:
        text = tokenizer.decode(list(ids), clean_up_tokenization_spaces=False)
        return tokenizer.encode(text, add_special_tokens=False) == list(ids)

    return check


def roundtrip_filter(tokenizer: Any, cfg: Any) -> Keep | None:
    """The decode/re-encode filter when `cfg.filter_ids` is on, else None."""
    return survives_roundtrip(tokenizer) if cfg.filter_ids else None


def initial_trigger(
    length: int, allowed_ids: torch.Tensor, gen: torch.Generator, keep: Keep | None, section: str
) -> torch.Tensor:
    """A random allowed trigger that passes the filter (at most 1000 draws; the first draw is
    taken when there is no filter, so an unfiltered run draws exactly one trigger)."""
    for _ in range(1000):
        trigger = allowed_ids[torch.randint(len(allowed_ids), (length,), generator=gen)]
        if keep is None or keep(trigger.tolist()):
            return trigger
    raise ValueError(f"no random trigger survives decode/re-encode; set {section}.filter_ids=false")
