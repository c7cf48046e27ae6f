"""The search of one universal-GCG restart (`optimise_restart`; the algorithm is described in
`monolm.attacks.gcg`), resumable after every step, and its gradient-free control.

Per step (as GraySwan's nanoGCG, `nanogcg/gcg.py`, with the multi-prompt gradient of Zou et al.):

1. the gradient of each optimisation text's loss w.r.t. a one-hot of the trigger (computed as the
   embedding gradient dotted with the embedding matrix), each text's [L, V] gradient normalised
   per position (`grad / grad.norm(dim=-1)`), summed over texts;
2. the `topk` tokens per position that raise the loss most (disallowed tokens never);
3. `search_width` candidates, each replacing `n_replace` random positions of the trigger with a
   random one of that position's top-k tokens (the control: a random allowed token instead);
4. candidates whose decode/re-encode changes the ids are dropped (`filter_ids`);
5. every remaining candidate scored exactly over all optimisation texts (batched);
6. the step's best candidate becomes the current trigger (`buffer_size` 0) or joins a buffer of
   the best few, whose best is stepped from next; the best trigger seen is kept.

The state after every step (trigger, buffer, best, budget curve and the generator's state) is
written as a unit (`units/<kind>part-<r>.json`), so a restart killed mid-way resumes to exactly
the trigger and numbers of an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from monolm.attacks import units
from monolm.attacks.scoring import AttackSetup, TextBatch, embedding_gradient
from monolm.attacks.trigger_search import with_triggers
from monolm.attacks.typeable import initial_trigger
from monolm.config import GCGConfig
from monolm.core.deadline import check_deadline
from monolm.core.runtime import model_device


@dataclass
class SearchState:
    """Everything a restart's next step depends on, as JSON-able values."""

    step: int
    initial_trigger_ids: list[int]
    current: list[int]
    buffer: list[list[Any]]  # [[loss, ids], ...] best first (buffer_size > 0 only)
    best_loss: float
    best_ids: list[int]
    best_per_text: list[float]  # the best trigger's loss per optimisation text, as scored
    curve: list[float]  # best-so-far mean loss: the initial trigger's, then after each step
    scored: list[int] = field(default_factory=list)  # candidate triggers scored per step
    rng: list[int] = field(default_factory=list)  # the generator's state after the step

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- pieces of a step
def trigger_losses(setup: AttackSetup, cands: torch.Tensor, texts: TextBatch) -> torch.Tensor:
    """Exact per-text losses [C, B] of `C` candidate triggers over the `B` texts (batched)."""
    B = texts.input_ids.shape[0]
    return setup.losses(with_triggers(setup.prefix, cands, texts)).view(cands.shape[0], B)


def one_hot_gradient(setup: AttackSetup, texts: TextBatch, trigger: torch.Tensor, grad_batch: int) -> torch.Tensor:
    """Sum over texts of each text's one-hot gradient [L, V], normalised per position."""
    model = setup.model
    E = model.get_input_embeddings().weight.detach().float()
    start, L = len(setup.prefix), trigger.numel()
    total = torch.zeros((L, E.shape[0]), device=E.device)
    for lo in range(0, texts.input_ids.shape[0], grad_batch):
        rows = texts.rows(torch.arange(lo, min(lo + grad_batch, texts.input_ids.shape[0])))
        seq = with_triggers(setup.prefix, trigger.view(1, -1), rows).to(model_device(model))
        grad, _ = embedding_gradient(model, seq.input_ids, seq.attention_mask, seq.target_mask, bf16=setup.bf16)
        g = grad[:, start : start + L, :].to(E.device) @ E.T  # [n, L, V]
        total += (g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)).sum(0)
    return total


def sample_candidates(
    trigger: torch.Tensor,
    width: int,
    n_replace: int,
    gen: torch.Generator,
    *,
    topk_ids: torch.Tensor | None,
    allowed_ids: torch.Tensor,
) -> torch.Tensor:
    """`width` candidates [W, L]: `n_replace` random positions each get a random top-k token of
    that position (`topk_ids` [L, k]) or, with `topk_ids` None (the control), a random allowed token."""
    L = trigger.numel()
    pos = torch.argsort(torch.rand((width, L), generator=gen), dim=1)[:, :n_replace]
    if topk_ids is None:
        vals = allowed_ids[torch.randint(len(allowed_ids), (width, n_replace), generator=gen)]
    else:
        pick = torch.randint(topk_ids.shape[1], (width, n_replace, 1), generator=gen)
        vals = torch.gather(topk_ids[pos], 2, pick).squeeze(2)
    return trigger.view(1, -1).repeat(width, 1).scatter_(1, pos, vals)


# --------------------------------------------------------------------------- the restart
@dataclass(frozen=True)
class Restart:
    """One restart's fixed inputs: where its state lives, and how candidates are drawn and kept."""

    setup: AttackSetup
    texts: TextBatch
    cfg: GCGConfig
    allowed: torch.Tensor  # bool over embedding rows
    keep: Callable[[Sequence[int]], bool] | None  # the decode/re-encode filter, None when off
    control: bool  # random candidates instead of gradient-ranked ones
    out_dir: Path
    kind: str
    index: int
    key: str

    def save(self, state: SearchState) -> None:
        units.write_unit(self.out_dir, self.kind + "part", self.index, self.key, state.to_json())

    def load(self) -> SearchState | None:
        payload = units.read_unit(self.out_dir, self.kind + "part", self.index, self.key)
        return SearchState(**payload) if payload is not None else None

    def drop_partial(self) -> None:
        units.unit_path(self.out_dir, self.kind + "part", self.index).unlink(missing_ok=True)


def _start(run: Restart, gen: torch.Generator, allowed_ids: torch.Tensor) -> SearchState:
    trigger = initial_trigger(run.cfg.trigger_len, allowed_ids, gen, run.keep, "attacks.gcg")
    per_text = trigger_losses(run.setup, trigger.view(1, -1), run.texts)[0]
    loss = float(per_text.mean())
    ids = trigger.tolist()
    return SearchState(0, ids, ids, [[loss, ids]], loss, ids, per_text.tolist(), [loss], [], [])


def _step(run: Restart, state: SearchState, gen: torch.Generator, allowed_ids: torch.Tensor) -> None:
    """One GCG (or control) step, in place."""
    cfg = run.cfg
    trigger = torch.as_tensor(state.current, dtype=torch.long)
    topk_ids = None
    if not run.control:
        grad = one_hot_gradient(run.setup, run.texts, trigger, cfg.grad_batch_size)
        grad[:, ~run.allowed.to(grad.device)] = float("-inf")
        k = min(cfg.topk, int(run.allowed.sum()))
        topk_ids = grad.topk(k, dim=1).indices.cpu()
    cands = sample_candidates(trigger, cfg.search_width, cfg.n_replace, gen, topk_ids=topk_ids, allowed_ids=allowed_ids)
    if run.keep is not None:
        cands = cands[[i for i, row in enumerate(cands.tolist()) if run.keep(row)]]
    state.scored.append(int(cands.shape[0]))
    if cands.shape[0]:
        per_text = trigger_losses(run.setup, cands, run.texts)
        means = per_text.mean(1)
        c = int(torch.argmax(means))
        loss, ids = float(means[c]), cands[c].tolist()
        if cfg.buffer_size == 0:
            state.current = ids
        else:
            state.buffer = sorted([*state.buffer, [loss, ids]], key=lambda e: -e[0])[: cfg.buffer_size]
            state.current = state.buffer[0][1]
        if loss > state.best_loss:
            state.best_loss, state.best_ids, state.best_per_text = loss, ids, per_text[c].tolist()
    state.curve.append(state.best_loss)
    state.step += 1


def optimise_restart(run: Restart, gen: torch.Generator, on_step: Callable[[SearchState], None] | None = None) -> dict:
    """Run (or resume) one restart to `cfg.steps` steps; returns its result payload."""
    allowed_ids = torch.nonzero(run.allowed).flatten()
    state = run.load()
    if state is None:
        state = _start(run, gen, allowed_ids)
    else:
        gen.set_state(torch.tensor(state.rng, dtype=torch.uint8))
    while state.step < run.cfg.steps:
        check_deadline("between GCG steps")
        _step(run, state, gen, allowed_ids)
        state.rng = gen.get_state().tolist()
        run.save(state)
        if on_step is not None:
            on_step(state)
    return {
        "initial_trigger_ids": state.initial_trigger_ids,
        "trigger_ids": state.best_ids,
        "opt_loss": state.best_loss,
        "opt_per_text": state.best_per_text,
        "curve": state.curve,
        "scored": state.scored,
        "steps": state.step,
    }
