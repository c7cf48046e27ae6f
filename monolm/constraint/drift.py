"""How much constraining changed a model's function, measured on held-out text (stage 1).

Reported by stage 1 beside the constraint summary, so that the cost of each `init` (see
`monolm.constraint.softplus`) is visible: the KL divergence of the next-token distributions and the
change in next-token NLL between the base model and its constrained copy.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from monolm.core.runtime import eval_mode, model_device


@torch.no_grad()
def function_drift(
    base_model: nn.Module,
    constrained_model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """How much constraining changed the function, on held-out token ids [B, T].

    `kl_mean`: mean over real positions of KL(p_base || p_constrained) of the next-token
    distribution, in nats. `nll_base` / `nll_constrained`: mean next-token NLL (nats/token) over
    positions whose target is a real token; `ppl_ratio` = exp(nll_constrained - nll_base).
    Both models are in eval mode for the duration and get their training flags back afterwards.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    kl_sum = kl_max = nll_b = nll_c = 0.0
    n_kl = n_nll = 0
    with eval_mode(base_model), eval_mode(constrained_model), parametrize.cached():
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start : start + batch_size]
            mask = attention_mask[start : start + batch_size]
            lp_b, lp_c = (_log_probs(model, ids, mask) for model in (base_model, constrained_model))
            valid = mask.bool().cpu()
            kl = (lp_b.exp() * (lp_b - lp_c)).sum(-1)[valid]
            kl_sum += float(kl.sum())
            kl_max = max(kl_max, float(kl.max())) if kl.numel() else kl_max
            n_kl += int(kl.numel())
            tgt = ids[:, 1:].cpu()
            tvalid = valid[:, 1:] & valid[:, :-1]
            nll_b += float(-lp_b[:, :-1].gather(-1, tgt[..., None])[..., 0][tvalid].sum())
            nll_c += float(-lp_c[:, :-1].gather(-1, tgt[..., None])[..., 0][tvalid].sum())
            n_nll += int(tvalid.sum())
    if n_kl == 0 or n_nll == 0:
        raise ValueError("function_drift: no real tokens to compare (empty mask or T < 2)")
    mean_b, mean_c = nll_b / n_nll, nll_c / n_nll
    return {
        "kl_mean": kl_sum / n_kl,
        "kl_max": kl_max,
        "nll_base": mean_b,
        "nll_constrained": mean_c,
        "ppl_base": float(torch.tensor(mean_b).exp()),
        "ppl_constrained": float(torch.tensor(mean_c).exp()),
        "ppl_ratio": float(torch.tensor(mean_c - mean_b).exp()),
        "n_positions": n_kl,
        "n_targets": n_nll,
    }


def _log_probs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities [B, T, V] in fp32, on the CPU."""
    device = model_device(model)
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    return torch.log_softmax(out.logits.float(), dim=-1).cpu()
