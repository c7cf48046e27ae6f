"""Empirical monotonicity of the constrained sublayers: how often does x <= x' give f(x') < f(x)?

Why measure instead of claim: a Linear layer with non-negative weights is monotone
(x <= x' elementwise ⇒ Wx + b <= Wx' + b), but the blocks around it are not, even with
non-negative weights everywhere:
- GELU is non-monotone: it decreases for inputs below about −0.75 (minimum ≈ −0.17), so a larger
  pre-activation can give a smaller activation; SiLU (gated MLPs) likewise below about −1.28, and
  the gate·up product of a gated MLP flips signs with its factors.
- A signed output projection (`mlp_in` leaves `dense_4h_to_h` signed) turns an increase of a
  hidden unit into a decrease of some outputs.
- LayerNorm subtracts the mean, so raising one coordinate lowers all the others; attention's
  softmax redistributes weight; residual paths add all of that to the stream.
So the model is not monotone, and reports say "non-negative FFN weights". This module measures,
for every constrained target, two sublayers:
- `linear`: the constrained Linear alone. Must show exactly 0 violations (a non-zero rate would
  mean the constraint is broken).
- `block`: the enclosing FFN or attention block exactly as the model computes it (for a GPT-NeoX
  FFN: Linear → GELU → Linear; for attention: the full attention call with its real mask and
  rotary embeddings). Its violation rate is the honest number.

Pairs: x' = x + δ with δ = |N(0, 1)| · step · rms(x) per coordinate (a small, strictly
non-negative move), x drawn from hidden states captured on real text (`capture_inputs`) or, if
none are given, standard normal (LayerNorm outputs are roughly standard normal per coordinate).
A coordinate violates when f(x')_j < f(x)_j − rel_tol · rms(f(x)); everything is evaluated in
float64 on copies of the sublayers so that rounding cannot masquerade as a violation.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from monolm.constraint.roles import Target, mlp_roles
from monolm.constraint.softplus import constrained_targets
from monolm.core.runtime import eval_mode, model_device

_CHUNK_ELEMENTS = 1 << 22  # input elements per evaluated chunk (32 MiB in float64)


@dataclass
class BlockCall:
    """One captured call of a block: its hidden-state input and the rest of the call."""

    hidden: torch.Tensor  # [N, H] rows (token-wise FFN blocks) or [B, T, H] (attention)
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    valid: torch.Tensor | None = None  # [B, T] real (non-padding) positions, attention only


@dataclass
class CapturedInputs:
    linear: dict[str, torch.Tensor]  # target name -> [N, in_features] rows of its real input
    blocks: dict[str, BlockCall]  # block name -> captured call
    source: str = "captured"


def _is_sequence_block(target: Target) -> bool:
    return target.role == "attn_out"


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _rows(x: torch.Tensor, valid: torch.Tensor | None, max_rows: int) -> torch.Tensor:
    """Flatten [B, T, D] to the rows of real tokens, evenly thinned to at most max_rows."""
    flat = x.detach().reshape(-1, x.shape[-1])
    if valid is not None and valid.numel() == flat.shape[0]:
        flat = flat[valid.reshape(-1).to(flat.device)]
    if flat.shape[0] > max_rows:
        idx = torch.linspace(0, flat.shape[0] - 1, max_rows).round().long().to(flat.device)
        flat = flat[idx]
    return flat.clone()


@torch.no_grad()
def _block_call(args: tuple, kwargs: dict, valid: torch.Tensor | None, max_rows: int, sequence: bool) -> BlockCall:
    """What a block was called with: its input rows (a block applied per position), or for a
    sequence block (attention) its whole call, cloned, so that it can be called again."""
    hidden = args[0] if args else kwargs["hidden_states"]
    if not sequence:
        return BlockCall(_rows(hidden, valid, max_rows))
    rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
    clone = lambda t: t.detach().clone()  # noqa: E731
    return BlockCall(
        hidden.detach().clone(),
        _map_tensors(tuple(args[1:]), clone),
        _map_tensors(rest, clone),
        valid.clone() if valid is not None else None,
    )


def capture_inputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_rows: int = 4096,
    targets: list[Target] | None = None,
) -> CapturedInputs:
    """Run `model` once on real text and record, with forward hooks, the input of every
    constrained Linear and of its enclosing block (attention blocks with their full call)."""
    targets = targets if targets is not None else constrained_targets(model)
    if not targets:
        raise ValueError(f"{type(model).__name__} has no constrained modules to capture inputs for")
    valid = attention_mask.bool() if attention_mask is not None else None
    linear: dict[str, torch.Tensor] = {}
    blocks: dict[str, BlockCall] = {}
    handles = []

    def linear_hook(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            if name not in linear:
                linear[name] = _rows(args[0], valid, max_rows)

        return hook

    def block_hook(name: str, sequence: bool):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            if name not in blocks:
                blocks[name] = _block_call(args, kwargs, valid, max_rows, sequence)

        return hook

    seen: set[str] = set()
    for t in targets:
        handles.append(t.module.register_forward_pre_hook(linear_hook(t.name)))
        if t.block_name not in seen:
            seen.add(t.block_name)
            handles.append(
                t.block.register_forward_pre_hook(block_hook(t.block_name, _is_sequence_block(t)), with_kwargs=True)
            )
    try:
        with eval_mode(model):
            device = model_device(model)
            mask = attention_mask.to(device) if attention_mask is not None else None
            model(input_ids=input_ids.to(device), attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return CapturedInputs(linear, blocks)


def _block_input_dim(target: Target) -> int:
    roles = mlp_roles(target.block) or {}
    attr = roles.get("mlp_in") or roles.get("mlp_up")
    if attr is None:
        raise ValueError(f"cannot tell the input width of block {target.block_name}")
    return getattr(target.block, attr).in_features


def _standard_normal_inputs(
    model: nn.Module, targets: list[Target], n_pairs: int, generator: torch.Generator, seq_len: int
) -> CapturedInputs:
    """Standard-normal inputs; attention blocks keep the mask/rotary kwargs of a real call on
    random token ids (their hidden states are then replaced by standard normals)."""
    linear = {t.name: torch.randn(n_pairs, t.module.in_features, generator=generator) for t in targets}
    blocks: dict[str, BlockCall] = {}
    seq_targets = [t for t in targets if _is_sequence_block(t)]
    if seq_targets:
        vocab = model.get_input_embeddings().num_embeddings
        ids = torch.randint(vocab, (1, seq_len), generator=generator)
        captured = capture_inputs(model, ids, targets=seq_targets)
        for name, call in captured.blocks.items():
            hidden = torch.randn(n_pairs, seq_len, call.hidden.shape[-1], generator=generator)
            blocks[name] = BlockCall(hidden, call.args, call.kwargs, None)
    for t in targets:
        if not _is_sequence_block(t) and t.block_name not in blocks:
            blocks[t.block_name] = BlockCall(torch.randn(n_pairs, _block_input_dim(t), generator=generator))
    return CapturedInputs(linear, blocks, source="standard_normal")


def _index_batch(obj: Any, idx: torch.Tensor, batch: int) -> Any:
    """Select rows `idx` of every tensor whose leading dim is the captured batch (B > 1);
    tensors with a broadcast leading dim of 1 are left alone."""

    def pick(t: torch.Tensor) -> torch.Tensor:
        if batch > 1 and t.dim() > 0 and t.shape[0] == batch:
            return t[idx.to(t.device)]
        return t

    return _map_tensors(obj, pick)


def _to64(obj: Any, device: torch.device) -> Any:
    return _map_tensors(obj, lambda t: t.to(device, torch.float64) if t.is_floating_point() else t.to(device))


def _measure(
    fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    call: BlockCall,
    n_pairs: int,
    generator: torch.Generator,
    step: float,
    rel_tol: float,
    chunk: int,
    device: torch.device,
) -> dict[str, float]:
    """Evaluate `fn` on `n_pairs` pairs (x, x + δ) drawn from `call`; count violations."""
    batch = call.hidden.shape[0]
    per_pair = max(1, call.hidden[0].numel())
    chunk = max(1, min(chunk, _CHUNK_ELEMENTS // per_pair))  # bounds memory for long sequences
    coords = viol_coords = viol_pairs = 0
    max_drop = 0.0
    done = 0
    while done < n_pairs:
        k = min(chunk, n_pairs - done)
        idx = torch.randint(batch, (k,), generator=generator)
        x = call.hidden[idx.to(call.hidden.device)].to(device, torch.float64)
        dims = tuple(range(1, x.dim()))
        rms = x.pow(2).mean(dim=dims, keepdim=True).sqrt().clamp_min(1e-12)
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float64).abs().to(device)
        x2 = x + noise * step * rms
        y1, y2 = fn(x, idx), fn(x2, idx)
        scale = y1.pow(2).mean(dim=dims, keepdim=True).sqrt().clamp_min(1e-30)
        drop = (y1 - y2) / scale  # > 0 where the output went down
        viol = drop > rel_tol
        counted = torch.ones_like(viol)
        if call.valid is not None:
            counted = call.valid[idx].to(device)[..., None].expand_as(viol)
            viol = viol & counted
            drop = torch.where(counted, drop, torch.zeros_like(drop))
        coords += int(counted.sum())
        viol_coords += int(viol.sum())
        viol_pairs += int(viol.flatten(1).any(dim=1).sum())
        max_drop = max(max_drop, float(drop.max().clamp_min(0)))
        done += k
    return {
        "n_pairs": n_pairs,
        "n_coords": coords,
        "coord_violation_rate": viol_coords / coords if coords else 0.0,
        "pair_violation_rate": viol_pairs / n_pairs,
        "max_relative_drop": max_drop,
    }


@torch.no_grad()
def monotonicity_violation_rate(
    model: nn.Module,
    n_pairs: int,
    generator: torch.Generator,
    inputs: CapturedInputs | torch.Tensor | None = None,
    *,
    step: float = 0.1,
    rel_tol: float = 1e-9,
    seq_len: int = 32,
    chunk: int = 256,
) -> list[dict[str, Any]]:
    """Violation rates of every constrained target's Linear and enclosing block.

    GELU, SiLU, LayerNorm, attention and signed output projections make the blocks
    non-monotone even with non-negative weights; this measures how much. Returns one row per
    (target, sublayer) with `sublayer` in {"linear", "block"}: `coord_violation_rate` (share
    of output coordinates with f(x')_j < f(x)_j), `pair_violation_rate` (share of pairs with any
    violation), `max_relative_drop` (largest drop in units of rms(f(x))), `n_pairs`,
    `n_coords`, and `input_source` ("captured" from real text, or "standard_normal").
    `inputs`: hidden states captured on real text (`capture_inputs`), or token ids [B, T] of
    real text to capture them from now, or None for standard-normal inputs.
    `generator` is a CPU torch.Generator; the same generator state gives the same numbers.
    """
    if n_pairs <= 0:
        raise ValueError(f"n_pairs must be > 0, got {n_pairs}")
    targets = constrained_targets(model)
    if not targets:
        raise ValueError(f"{type(model).__name__} has no constrained modules")
    device = model_device(model)
    if inputs is None:
        inputs = _standard_normal_inputs(model, targets, n_pairs, generator, seq_len)
    elif isinstance(inputs, torch.Tensor):
        if inputs.is_floating_point() or inputs.dim() != 2:
            raise TypeError("tensor inputs must be token ids [B, T]; pass hidden states via capture_inputs")
        inputs = capture_inputs(model, inputs, targets=targets)
    rows: list[dict[str, Any]] = []
    block_results: dict[str, dict[str, float]] = {}
    for t in targets:
        if t.name not in inputs.linear or t.block_name not in inputs.blocks:
            raise KeyError(f"no captured inputs for {t.name} / {t.block_name}")
        lin64 = copy.deepcopy(t.module).to(device, torch.float64).eval()
        lin_call = BlockCall(inputs.linear[t.name])
        res = _measure(lambda x, _i, f=lin64: f(x), lin_call, n_pairs, generator, step, rel_tol, chunk, device)
        del lin64
        rows.append(_row(t, "linear", t.name, t.module, inputs.source, res))
        if t.block_name not in block_results:
            call = inputs.blocks[t.block_name]
            fn = _block_function(t, call, device)
            block_results[t.block_name] = _measure(fn, call, n_pairs, generator, step, rel_tol, chunk, device)
            del fn
        rows.append(_row(t, "block", t.block_name, t.block, inputs.source, block_results[t.block_name]))
    return rows


def _block_function(
    target: Target, call: BlockCall, device: torch.device
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`f(x, idx)`: the target's enclosing block on a float64 copy. An attention block is called
    with the rest of its captured call (rows `idx` of it), a token-wise FFN block with `x` alone."""
    block64 = copy.deepcopy(target.block).to(device, torch.float64).eval()
    if not _is_sequence_block(target):

        def ffn(x: torch.Tensor, _idx: torch.Tensor) -> torch.Tensor:
            out = block64(x)
            return out[0] if isinstance(out, tuple) else out

        return ffn
    batch = call.hidden.shape[0]
    args64, kwargs64 = _to64(call.args, device), _to64(call.kwargs, device)

    def attention(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        out = block64(x, *_index_batch(args64, idx, batch), **_index_batch(kwargs64, idx, batch))
        return out[0] if isinstance(out, tuple) else out

    return attention


def _row(t: Target, sublayer: str, name: str, module: nn.Module, source: str, res: dict[str, float]) -> dict[str, Any]:
    cls = type(module).__name__.removeprefix("Parametrized")
    return {
        "target": t.name,
        "role": t.role,
        "sublayer": sublayer,
        "module": name,
        "module_class": cls,
        "input_source": source,
        **res,
    }
