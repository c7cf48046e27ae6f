"""The search of one UAT restart (`optimise_restart`; the algorithm is described in
`monolm.attacks.uat`) and the sequences it scores: `prefix + trigger + text` rows whose context
prefix and trigger are attended but never targets, so only original text tokens are scored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from monolm.attacks.scoring import AttackSetup, embedding_gradient, first_order_scores
from monolm.attacks.sequences import TextBatch, check_texts, context_prefix, pad_batch, text_target_mask, truncate
from monolm.attacks.typeable import Keep, initial_trigger
from monolm.config import UATConfig
from monolm.core.deadline import check_deadline
from monolm.core.runtime import model_device

NO_TRIGGER = torch.zeros((1, 0), dtype=torch.long)


# --------------------------------------------------------------------------- sequences
def text_batch(texts: Sequence[Sequence[int]], has_prefix: bool) -> TextBatch:
    """The texts alone, right-padded, with their target masks (every text token, except the
    first one when there is no prefix to predict it from)."""
    return pad_batch(texts, [text_target_mask(0, len(t), has_prefix=has_prefix) for t in texts])


def with_triggers(prefix: Sequence[int], triggers: torch.Tensor, texts: TextBatch) -> TextBatch:
    """Rows `prefix + triggers[c] + texts[b]`, candidate-major (row = c * n_texts + b).

    Prefix and trigger positions are attended but never targets; only text tokens are."""
    C, L = triggers.shape
    B = texts.input_ids.shape[0]
    head = torch.cat([torch.as_tensor(list(prefix), dtype=torch.long).view(1, -1).expand(C, -1), triggers], 1)
    n_head = head.shape[1]
    ids = torch.cat([head.repeat_interleave(B, 0), texts.input_ids.repeat(C, 1)], 1)
    am = torch.cat([torch.ones((C * B, n_head), dtype=torch.long), texts.attention_mask.repeat(C, 1)], 1)
    tm = torch.cat([torch.zeros((C * B, n_head), dtype=torch.bool), texts.target_mask.repeat(C, 1)], 1)
    return TextBatch(ids, am, tm)


def trigger_row(trigger_ids: Sequence[int]) -> torch.Tensor:
    return torch.as_tensor(list(trigger_ids), dtype=torch.long).view(1, -1)


def trigger_batch(prefix: Sequence[int], trigger_ids: Sequence[int], texts: Sequence[Sequence[int]]) -> TextBatch:
    """`prefix + trigger + text` for each text, with the target mask the attack scores (public so
    tests can check that no trigger or prefix position is ever a target)."""
    return with_triggers(prefix, trigger_row(trigger_ids), text_batch(texts, bool(prefix)))


def clean_losses(setup: AttackSetup, texts: TextBatch) -> list[float]:
    """Each text's loss without a trigger (after the context prefix alone)."""
    return setup.losses(with_triggers(setup.prefix, NO_TRIGGER, texts)).tolist()


# --------------------------------------------------------------------------- a run's texts
def held_out_texts(
    opt_texts: Sequence[Sequence[int]], eval_texts: Sequence[Sequence[int]], cfg: Any, prefix: Sequence[int]
) -> tuple[list[list[int]], list[list[int]]]:
    """The optimisation and evaluation texts, cut to size, checked to be scorable and disjoint."""
    opt = truncate(opt_texts[: cfg.n_opt_texts], cfg.text_max_tokens)
    ev = truncate(eval_texts[: cfg.n_eval_texts], cfg.text_max_tokens)
    check_texts(opt, prefix, "opt_texts")
    check_texts(ev, prefix, "eval_texts")
    shared = {tuple(t) for t in opt} & {tuple(t) for t in ev}
    if shared:
        raise ValueError(
            f"{len(shared)} evaluation texts also occur among the optimisation texts; "
            "the trigger must be reported on held-out texts"
        )
    return opt, ev


@dataclass(frozen=True)
class TriggerRun:
    """What a universal-trigger run (UAT, GCG) works with: its setup (model, context prefix,
    batch sizer, precision), the optimisation and held-out evaluation texts as lists and as
    batches, and the allowed tokens."""

    setup: AttackSetup
    opt: list[list[int]]
    ev: list[list[int]]
    allowed: torch.Tensor
    opt_batch: TextBatch
    ev_batch: TextBatch

    @classmethod
    def of(cls, model, tokenizer, opt_texts, eval_texts, cfg, bf16, allowed_mask: Callable[[], torch.Tensor]):
        """The run's texts (`held_out_texts`), then its vocabulary (`allowed_mask()`), then its setup."""
        prefix = context_prefix(tokenizer)
        opt, ev = held_out_texts(opt_texts, eval_texts, cfg, prefix)
        allowed = allowed_mask()
        setup = AttackSetup.of(model, prefix, cfg.score_batch_size, bf16)
        return cls(setup, opt, ev, allowed, text_batch(opt, bool(prefix)), text_batch(ev, bool(prefix)))


# --------------------------------------------------------------------------- optimisation
def _grad_batch(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Indices of the optimisation texts used for one position step (all of them if they fit)."""
    if size >= n:
        return torch.arange(n)
    return torch.sort(torch.randperm(n, generator=gen)[:size]).values


def _top_replacements(scores: torch.Tensor, trigger: torch.Tensor, p: int, k: int, keep: Keep | None) -> torch.Tensor:
    """The `k` best-scored replacements for position `p`; with a filter, the `k` best whose
    trigger survives it (fewer when fewer do), so the exact re-scoring budget stays `k`."""
    if keep is None:
        return torch.topk(scores, k).indices.cpu()
    scores = scores.detach().cpu()
    row = trigger.tolist()
    picked: list[int] = []
    for t in torch.argsort(scores, descending=True).tolist():
        if len(picked) == k or scores[t] == float("-inf"):
            break
        row[p] = t
        if keep(row):
            picked.append(t)
    return torch.tensor(picked, dtype=torch.long)


def _position_step(
    setup: AttackSetup,
    texts: TextBatch,
    trigger: torch.Tensor,
    p: int,
    k: int,
    allowed: torch.Tensor,
    keep: Keep | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The current token at trigger position `p` and its top-`k` first-order replacements
    (candidate 0 is the current token; with `keep`, only replacements whose trigger passes it),
    with each candidate trigger's exact mean loss over `texts`."""
    model, prefix = setup.model, setup.prefix
    cur = with_triggers(prefix, trigger.view(1, -1), texts).to(model_device(model))
    grad, _ = embedding_gradient(model, cur.input_ids, cur.attention_mask, cur.target_mask, bf16=setup.bf16)
    g = grad[:, len(prefix) + p, :].mean(0, keepdim=True)  # gradient of the mean loss
    scores = first_order_scores(g, model.get_input_embeddings().weight.detach(), allowed)[0]
    scores[trigger[p]] = float("-inf")
    top = _top_replacements(scores, trigger, p, k, keep)
    tokens = torch.cat([trigger[p].view(1), top])  # candidate 0 = the current trigger
    cands = trigger.view(1, -1).repeat(len(tokens), 1)
    cands[:, p] = tokens
    losses = setup.losses(with_triggers(prefix, cands, texts))
    return tokens, losses.view(len(tokens), texts.input_ids.shape[0]).mean(1)


def _sweep(
    setup: AttackSetup,
    opt: TextBatch,
    cfg: UATConfig,
    trigger: torch.Tensor,
    sweep: int,
    k: int,
    allowed: torch.Tensor,
    gen: torch.Generator,
    steps: list[dict[str, Any]],
    bar: Any,
    keep: Keep | None = None,
) -> tuple[bool, float]:
    """One sweep over the trigger's positions, changing `trigger` in place and recording each
    position step in `steps`: (whether a token changed, the current trigger's batch loss)."""
    n = opt.input_ids.shape[0]
    changed = False
    current = float("nan")
    for p in range(cfg.trigger_len):
        check_deadline("between UAT position steps")
        idx = _grad_batch(n, cfg.grad_batch_size, gen)
        tokens, losses = _position_step(setup, opt.rows(idx), trigger, p, k, allowed, keep)
        best = int(torch.argmax(losses[1:])) + 1 if len(tokens) > 1 else 0  # 0: no replacement passed
        accept = bool(losses[best] > losses[0])
        steps.append(
            {
                "sweep": sweep,
                "position": p,
                "n_texts": len(idx),
                "loss_before": float(losses[0]),
                "best_candidate_loss": float(losses[best]),
                "token_before": int(trigger[p]),
                "token_after": int(tokens[best]) if accept else int(trigger[p]),
                "accepted": accept,
            }
        )
        if accept:
            trigger[p] = tokens[best]
            changed = True
        current = float(losses[best] if accept else losses[0])
        bar.update(1)
        bar.set_postfix(loss=f"{current:.3f}")
    return changed, current


def optimise_restart(
    setup: AttackSetup,
    opt: TextBatch,
    cfg: UATConfig,
    *,
    allowed: torch.Tensor,
    gen: torch.Generator,
    progress: bool = False,
    desc: str = "uat",
    on_sweep: Callable[[int, float], None] | None = None,
    keep: Keep | None = None,
) -> dict[str, Any]:
    """One restart: random allowed initial trigger (one that passes `keep`, the decode/re-encode
    filter, when given), then greedy sweeps until no change.
    `on_sweep(sweeps done, current trigger's batch loss)` is called after each sweep."""
    allowed_ids = torch.nonzero(allowed).flatten()
    trigger = initial_trigger(cfg.trigger_len, allowed_ids, gen, keep, "attacks.uat")
    initial = trigger.tolist()
    k = min(cfg.top_k, int(allowed.sum()) - 1)
    steps: list[dict[str, Any]] = []
    converged = False
    sweeps = 0
    bar = tqdm(total=cfg.max_sweeps * cfg.trigger_len, desc=desc, disable=(not progress) or None, leave=False)
    for sweep in range(cfg.max_sweeps):
        sweeps += 1
        changed, current = _sweep(setup, opt, cfg, trigger, sweep, k, allowed, gen, steps, bar, keep)
        if on_sweep is not None:
            on_sweep(sweeps, current)
        if not changed:
            converged = True
            break
    bar.close()
    return {
        "initial_trigger_ids": initial,
        "trigger_ids": trigger.tolist(),
        "sweeps": sweeps,
        "converged": converged,
        "steps": steps,
    }
