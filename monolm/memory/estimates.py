"""Peak-memory estimates from a model's shape, and the plan that makes a stage fit its device.

Why: a stage that runs out of device memory after an hour of loading and warming up wastes a GPU
allocation; one that stops before the first step, naming the model, the card and the estimate,
costs nothing. So before training, evaluation or an attack on CUDA the stage estimates its peak
memory, compares it with the device's free memory, and, when it does not fit, picks the largest
micro-batch (batch, candidate batch) that does — for training raising gradient accumulation so
the effective batch, and so the science, stays the same. The plan is logged and recorded in the
stage's manifest (`metrics["memory_plan"]`).

The estimate counts what PyTorch keeps alive, in bytes (`c` = 2 under bf16 autocast, else 4):

* static: fp32 weights (4P), gradients (4P) and AdamW's two moments (8P) while training; the
  constrained arm adds its materialised W = softplus(V) (4 bytes per constrained weight, cached
  for the whole forward and backward);
* autocast's bf16 copies of the leaf weights (2 bytes per matmul weight) under bf16;
* activations per token and layer: the fp32 residual stream (4h) plus, in compute precision, the
  tensors a GPT-NeoX layer saves for backward (LayerNorm outputs, the fused QKV buffer, rotated
  q/k, attention output, the FFN input and GELU output: c * (8h + 2f)); fused (SDPA) attention
  keeps no [T, T] matrix. With gradient checkpointing only the layer inputs (4h) are kept, and
  one layer is recomputed at a time (counted twice: its activations and their gradients);
* the LM head: c bytes per logit, its log-softmax (4) and under bf16 an fp32 copy (4) in the
  forward, and 12 bytes at the start of the backward;
* the optimizer step: AdamW's foreach implementation (CUDA) allocates one more fp32 copy of the
  moments (4P); the per-tensor one (CPU) one copy of the largest tensor.

Calibrated against the measured CPU peak (RSS) on small shapes in tests/test_memory.py; on a GPU,
`bench/gpu.py` prints the estimate next to `torch.cuda.max_memory_allocated()`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from monolm.core.cross_entropy import CE_CHUNK_ELEMENTS  # the slice the one kernel upcasts at a time

log = logging.getLogger("monolm.memory")

GiB = 1 << 30
# Memory kept free for the allocator's fragmentation and for kernels' workspaces.
MIN_HEADROOM_BYTES = GiB
HEADROOM_FRACTION = 0.05

# Cards a cluster user plans for (`monolm plan`): the memory PyTorch reports as total, minus the
# CUDA context (~0.5 GiB) that is gone before the first tensor.
CARDS: dict[str, int] = {
    "A100-40GB": 42_298_834_944 - GiB // 2,
    "A100-80GB": 85_051_572_224 - GiB // 2,
}


def size(n: int | float) -> str:
    """Bytes for people: GiB from one GiB up, MiB below."""
    return f"{n / GiB:.1f} GiB" if abs(n) >= GiB else f"{n / 2**20:.1f} MiB"


class MemoryPlanError(RuntimeError):
    """Even the smallest batch does not fit the device: stopped before any compute."""


# ModelShape's sizes and the Hugging Face config attributes that hold them.
_HF_SIZES = {
    "layers": "num_hidden_layers",
    "hidden": "hidden_size",
    "heads": "num_attention_heads",
    "ffn": "intermediate_size",
    "vocab": "vocab_size",
}


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model (GPT-NeoX or a Llama-style gated MLP)."""

    name: str
    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    parameters: int
    max_positions: int
    gated: bool = False  # three FFN matrices (gate, up, down) instead of two

    @classmethod
    def from_architecture(cls, arch) -> ModelShape:
        return cls(arch.name, arch.layers, arch.hidden, arch.heads, arch.ffn, arch.vocab, arch.parameters,
                   arch.max_positions)  # fmt: skip

    @classmethod
    def from_config(cls, config, name: str, parameters: int) -> ModelShape:
        """From a Hugging Face config (`parameters` counted on the meta device by the caller)."""
        sizes = {name_: getattr(config, attr) for name_, attr in _HF_SIZES.items()}
        max_positions = getattr(config, "max_position_embeddings", 0) or 0
        gated = getattr(config, "model_type", "") in ("llama", "mistral", "qwen2", "gemma")
        return cls(name=name, parameters=parameters, max_positions=max_positions, gated=gated, **sizes)

    @property
    def matmul_parameters(self) -> int:
        """Parameters that take part in matrix products (all but the input embedding, a lookup)."""
        return self.parameters - self.vocab * self.hidden

    @property
    def largest_tensor(self) -> int:
        return max(self.vocab * self.hidden, self.hidden * self.ffn)

    def constrained_parameters(self, variant: str) -> int:
        """How many weights the constraint variant reparametrizes (W = softplus(V))."""
        ffn_matrix = self.hidden * self.ffn
        per_layer = {
            "mlp_in": ffn_matrix,
            "mlp_both": 2 * ffn_matrix,
            "mlp_in_attn_out": ffn_matrix + self.hidden * self.hidden,
            "gated_updown": 2 * ffn_matrix,
            "gated_all": 3 * ffn_matrix,
        }
        if variant not in per_layer:
            raise ValueError(f"unknown constraint variant {variant!r}; known: {', '.join(per_layer)}")
        return self.layers * per_layer[variant]

    def forward_flops_per_token(self, seq_len: int) -> float:
        """Model FLOPs of one forward pass per token: 2 per matmul weight plus attention's
        QK^T and AV (4 * layers * hidden * seq_len, the PaLM convention)."""
        return 2.0 * self.matmul_parameters + 4.0 * self.layers * self.hidden * seq_len

    def train_flops_per_token(self, seq_len: int) -> float:
        """Model FLOPs of forward + backward per token (3x the forward; recomputation by gradient
        checkpointing is not model FLOPs, as in MFU)."""
        return 3.0 * self.forward_flops_per_token(seq_len)


def _compute_bytes(bf16: bool) -> int:
    return 2 if bf16 else 4


def layer_activation_bytes(shape: ModelShape, tokens: int, bf16: bool) -> int:
    """What one layer saves for backward, for `tokens` tokens (see the module doc)."""
    c = _compute_bytes(bf16)
    ffn_saved = 4 * shape.ffn if shape.gated else 2 * shape.ffn
    return tokens * (4 * shape.hidden + c * (8 * shape.hidden + ffn_saved))


def training_bytes(
    shape: ModelShape,
    *,
    micro_batch: int,
    seq_len: int,
    bf16: bool,
    checkpointing: bool,
    constrained_parameters: int = 0,
    foreach_optimizer: bool = True,
) -> dict[str, int]:
    """Peak memory of one training step (forward, backward, AdamW step) by component; `peak` is
    the static part plus the largest transient phase."""
    P, Nc, tokens = shape.parameters, constrained_parameters, micro_batch * seq_len
    c = _compute_bytes(bf16)
    static = {"weights": 4 * P, "gradients": 4 * P, "adamw_state": 8 * P, "constrained_w": 4 * Nc}
    weight_cache = 2 * (shape.matmul_parameters - Nc) if bf16 else 0  # autocast's bf16 copies of leaves
    cast_constrained = 2 * Nc if bf16 else 0  # bf16 copies of the (non-leaf) W, saved for backward
    logits = tokens * shape.vocab
    # forward: the logits, their fp32 copy (bf16 only) and the log-softmax; backward: two fp32 gradients more
    logits_forward = logits * (c + 4 + (4 if bf16 else 0))
    logits_backward = logits * (c + 12)
    layer = layer_activation_bytes(shape, tokens, bf16)
    if checkpointing:
        saved = shape.layers * tokens * 4 * shape.hidden
        per_layer_weights = 2 * (shape.matmul_parameters - shape.vocab * shape.hidden) // shape.layers if bf16 else 0
        forward = saved + weight_cache + logits_forward
        backward = saved + max(logits_backward, 2 * layer + per_layer_weights)
    else:
        saved = shape.layers * layer + cast_constrained
        forward = saved + weight_cache + logits_forward
        backward = saved + weight_cache + logits_backward
    optimizer = 4 * P if foreach_optimizer else 2 * 4 * shape.largest_tensor
    phases = {"forward": forward, "backward": backward, "optimizer_step": optimizer}
    peak = sum(static.values()) + max(phases.values())
    return {**static, **{f"phase_{k}": v for k, v in phases.items()}, "peak": peak}


def inference_bytes(
    shape: ModelShape,
    *,
    batch: int,
    seq_len: int,
    bf16: bool,
    resident_models: int = 1,
    logit_positions: int | None = None,
    weight_cache: bool = True,
) -> dict[str, int]:
    """Peak memory of a forward pass without gradients (evaluation, candidate scoring):
    `resident_models` fp32 models on the device, autocast's bf16 weight copies (`weight_cache`:
    autocast caches the copies of weights that require grad; the attacks freeze them), one layer's
    transient activations, the logits of `logit_positions` per row (default all) and the fp32
    cross-entropy chunk."""
    tokens = batch * seq_len
    kept = batch * (seq_len if logit_positions is None else logit_positions) * shape.vocab
    parts = {
        "weights": 4 * shape.parameters * resident_models,
        "weight_cache": 2 * shape.matmul_parameters if bf16 and weight_cache else 0,
        "activations": layer_activation_bytes(shape, tokens, bf16),  # one layer's, transient
        "logits": kept * _compute_bytes(bf16),
        # log-softmax of a chunk in fp32, plus its fp32 copy when the logits are bf16
        "cross_entropy": (8 if bf16 else 4) * min(kept, CE_CHUNK_ELEMENTS),
    }
    return {**parts, "peak": sum(parts.values())}


def gradient_pass_bytes(
    shape: ModelShape, *, batch: int, seq_len: int, bf16: bool, resident_models: int
) -> dict[str, int]:
    """Peak memory of an attack's gradient with respect to the input embeddings (parameters
    frozen: no parameter gradients, no autocast weight cache, all activations kept)."""
    tokens = batch * seq_len
    c = _compute_bytes(bf16)
    parts = {
        "weights": 4 * shape.parameters * resident_models,
        "activations": shape.layers * layer_activation_bytes(shape, tokens, bf16),
        "logits": tokens * shape.vocab * (c + 12),
    }
    return {**parts, "peak": sum(parts.values())}


@dataclass
class MemoryPlan:
    """The outcome of planning one stage's memory: what was asked, what was chosen and why."""

    stage: str
    model: str
    device: str
    setting: str  # the batch setting the plan chooses, e.g. training.common.micro_batch_size
    requested: int
    chosen: int
    estimate_bytes: int  # at the chosen value
    capacity_bytes: int | None  # usable device memory the plan compared against (None: not enforced)
    breakdown: dict[str, int] = field(default_factory=dict)
    grad_accum_requested: int | None = None
    grad_accum_chosen: int | None = None

    @property
    def changed(self) -> bool:
        return self.chosen != self.requested

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["estimate_gib"] = round(self.estimate_bytes / GiB, 2)
        out["capacity_gib"] = None if self.capacity_bytes is None else round(self.capacity_bytes / GiB, 2)
        return out

    def describe(self) -> str:
        where = (
            f"{size(self.capacity_bytes)} usable on {self.device}"
            if self.capacity_bytes is not None
            else f"{self.device}, not enforced"
        )
        text = f"memory plan for {self.stage} ({self.model}): estimated peak {size(self.estimate_bytes)}; {where}"
        if self.changed:
            text += f"; {self.setting} {self.requested} -> {self.chosen}"
            if self.grad_accum_chosen is not None:
                accum = f"{self.grad_accum_requested} -> {self.grad_accum_chosen}"
                text += f", grad_accum_steps {accum} (same effective batch)"
        return text


def usable_bytes(free: int, total: int) -> int:
    """Free memory minus headroom for fragmentation and workspaces (5% of the card, >= 1 GiB)."""
    return free - max(MIN_HEADROOM_BYTES, int(HEADROOM_FRACTION * total))


def device_capacity(device) -> tuple[int | None, str]:
    """(usable bytes, description) of a CUDA device; (None, name) elsewhere: CPU memory is not
    planned (the operating system swaps or kills, and a CPU run is small by construction)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None, str(device)
    free, total = torch.cuda.mem_get_info(device)
    name = torch.cuda.get_device_name(device)
    return usable_bytes(free, total), f"{device} ({name}, {total / GiB:.1f} GiB, {free / GiB:.1f} GiB free)"


def choose(
    candidates: Iterable[int], estimate, capacity: int | None, *, what: str, model: str, device: str
) -> tuple[int, dict[str, int]]:
    """The first (largest) candidate whose estimate fits `capacity` and its breakdown; without a
    capacity, the first candidate. Raises MemoryPlanError naming the model, the device memory and
    the estimate of the smallest candidate when none fits."""
    candidates = list(candidates)
    if capacity is None:
        return candidates[0], estimate(candidates[0])
    for value in candidates:
        parts = estimate(value)
        if parts["peak"] <= capacity:
            return value, parts
    smallest = estimate(candidates[-1])
    parts = ", ".join(f"{k} {size(v)}" for k, v in smallest.items() if k != "peak" and v)
    raise MemoryPlanError(
        f"{model} does not fit {device}: {what}={candidates[-1]} needs an estimated "
        f"{size(smallest['peak'])}, {size(capacity)} usable ({parts}). "
        "Use a card with more memory, gradient checkpointing, a shorter sequence, or a smaller model."
    )


def micro_batch_candidates(micro_batch: int, grad_accum: int) -> list[int]:
    """Micro-batch sizes <= `micro_batch` that divide the effective batch, largest first: each
    keeps micro-batch x accumulation steps equal to the effective batch."""
    effective = micro_batch * grad_accum
    return [m for m in range(micro_batch, 0, -1) if effective % m == 0]


def plan_training(
    shape: ModelShape,
    *,
    stage: str,
    micro_batch: int,
    grad_accum: int,
    seq_len: int,
    bf16: bool,
    checkpointing: bool,
    constrained_parameters: int,
    capacity: int | None,
    device: str,
    foreach_optimizer: bool = True,
) -> MemoryPlan:
    """The largest micro-batch (dividing the effective batch) whose training step fits."""

    def estimate(m: int) -> dict[str, int]:
        return training_bytes(
            shape,
            micro_batch=m,
            seq_len=seq_len,
            bf16=bf16,
            checkpointing=checkpointing,
            constrained_parameters=constrained_parameters,
            foreach_optimizer=foreach_optimizer,
        )

    candidates = micro_batch_candidates(micro_batch, grad_accum)
    plan = _plan(shape, stage, "micro_batch_size", micro_batch, candidates, estimate, capacity, device)
    return replace(plan, grad_accum_requested=grad_accum, grad_accum_chosen=micro_batch * grad_accum // plan.chosen)


def plan_batch(
    shape: ModelShape, *, stage: str, setting: str, requested: int, estimate, capacity: int | None, device: str
) -> MemoryPlan:
    """The largest batch <= `requested` whose `estimate(batch)` fits (evaluation, attacks)."""
    return _plan(shape, stage, setting, requested, range(requested, 0, -1), estimate, capacity, device)


def _plan(
    shape: ModelShape,
    stage: str,
    setting: str,
    requested: int,
    candidates: Iterable[int],
    estimate,
    capacity: int | None,
    device: str,
) -> MemoryPlan:
    """The first of `candidates` whose `estimate` fits `capacity` (`choose`), as the stage's plan."""
    chosen, parts = choose(candidates, estimate, capacity, what=setting, model=shape.name, device=device)
    return MemoryPlan(stage, shape.name, device, setting, requested, chosen, parts["peak"], capacity, parts)
