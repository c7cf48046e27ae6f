"""The one chunked cross-entropy of evaluation and the attacks, and the one CPU token cap per
forward pass.

Why one: the logits of a batch over a 50k vocabulary are upcast to fp32 a slice of
`CE_CHUNK_ELEMENTS` at a time (a whole fp32 copy of Pythia's logits at batch 8 x 2048 tokens would
be ~3 GB), and the memory estimate (`monolm.memory.estimates`) counts exactly that slice. No torch
at module level, so the estimate reads the constant without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Logits are upcast to fp32 for the cross-entropy at most this many at a time.
CE_CHUNK_ELEMENTS = 1 << 26
# On the CPU, throughput per token peaks at about a thousand tokens per forward pass and falls once
# the activations outgrow the caches (bench/attacks.py measured it); a GPU wants the largest batch,
# up to memory, which the out-of-memory back-off handles.
CPU_TOKENS_PER_FORWARD = 1024
UNLIMITED = 1 << 62


def max_tokens_per_forward(device: torch.device) -> int:
    """Tokens one forward pass may hold: `CPU_TOKENS_PER_FORWARD` on the CPU, unlimited elsewhere."""
    return CPU_TOKENS_PER_FORWARD if device.type == "cpu" else UNLIMITED


def cross_entropy_fp32(
    logits: torch.Tensor, labels: torch.Tensor, max_elements: int = CE_CHUNK_ELEMENTS
) -> torch.Tensor:
    """Per-token cross-entropy shaped like `labels`, from `logits` of shape `labels.shape + (V,)`,
    upcast to fp32 at most `max_elements` logits at a time, so a batch of bf16 logits over a large
    vocabulary is never copied to fp32 all at once."""
    import torch
    import torch.nn.functional as F

    V = logits.shape[-1]
    if labels.numel() == 0:  # e.g. a flip of the last token: nothing after it is predicted
        return torch.zeros(labels.shape, dtype=torch.float32, device=logits.device)
    flat, flat_labels = logits.reshape(-1, V), labels.reshape(-1)
    step = max(1, max_elements // V)
    parts = [
        F.cross_entropy(flat[i : i + step].float(), flat_labels[i : i + step], reduction="none")
        for i in range(0, flat.shape[0], step)
    ]
    return torch.cat(parts).view(labels.shape)
