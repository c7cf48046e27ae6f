"""Stage 1's science: non-negative weights W = softplus(V) on selected `nn.Linear` layers.

Why a reparametrization and not clipping: the optimizer updates V freely and W = softplus(V) is
non-negative by construction after every step. Its gradient dW/dV = sigmoid(V) is never exactly
zero, but it is tiny where W is tiny: a weight that starts at W ≈ eps (every negative weight under
`init: clamp`, about half of them) has dW/dV ≈ eps and stays there, so in effect it is pruned and
frozen. Stage 1 and the constrained arm's training report that share (`monolm.constraint.frozen`).
`torch.nn.utils.parametrize` keeps the original module structure (so HF forward code, hooks
and attacks work unchanged) and works with `parametrize.cached()`, which computes softplus once
per forward instead of once per weight access.

Which weights: a *variant* names roles, and roles are resolved from the model's structure
(MLP / attention blocks recognised by class and children), never by substring matches on
parameter names:

| variant           | roles constrained                      | GPT-NeoX (Pythia) modules            |
|-------------------|----------------------------------------|--------------------------------------|
| `mlp_in`          | FFN input projection                   | `mlp.dense_h_to_4h`                  |
| `mlp_both`        | FFN input and output projections       | `mlp.dense_h_to_4h`, `mlp.dense_4h_to_h` |
| `mlp_in_attn_out` | FFN input + attention output projection| `mlp.dense_h_to_4h`, `attention.dense` |
| `gated_updown`    | gated FFN up and down projections      | Llama-style `mlp.up_proj`, `mlp.down_proj` |
| `gated_all`       | gated FFN gate, up and down            | Llama-style `gate_proj`, `up_proj`, `down_proj` |

Biases stay signed: a bias shifts a unit's output but does not change in which direction it moves
when the input grows, so it is irrelevant to the non-negativity argument.

How pretrained W becomes V (`init`, reported by stage 1 together with the function drift):
- `abs`:   V = softplus⁻¹(|W| + eps). The original study's choice. Keeps every weight's magnitude
  but flips the sign of negative weights, which changes the function a lot.
- `clamp`: V = softplus⁻¹(max(W, eps)). Keeps positive weights exactly and sends negative ones
  to ~0; the nearest non-negative matrix elementwise.

"Non-negative" is not "monotone": with GELU, LayerNorm and residual paths the blocks and the
model are not monotone; see `monolm.constraint.monotonicity` for the empirical violation rate.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

# Role resolution lives in `roles`; `resolve_targets` and `role_index` are imported from here too.
from monolm.constraint.roles import Target, resolve_targets, role_index
from monolm.core.artifacts import atomic_dir

Init = Literal["abs", "clamp"]

INITS: tuple[str, ...] = ("abs", "clamp")

CONSTRAINT_FILE = "constraint.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------- softplus maths
def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """softplus⁻¹(y) = log(expm1(y)), computed as y + log(-expm1(-y)).

    The naive log(exp(y) - 1) overflows for large y and loses everything to cancellation for
    small y; this form is exact in both limits (-expm1(-y) lies in (0, 1] for y > 0). Computed in
    float64 and returned in y's dtype. y must be finite and > 0 (softplus never reaches 0).
    """
    if not torch.is_floating_point(y):
        raise TypeError(f"inverse_softplus needs a floating-point tensor, got {y.dtype}")
    y64 = y.detach().to(torch.float64)
    if not bool(torch.isfinite(y64).all()):
        raise ValueError("inverse_softplus: input has non-finite values")
    if y64.numel() and float(y64.min()) <= 0.0:
        raise ValueError(f"inverse_softplus: input must be > 0 (min is {float(y64.min()):.3g})")
    return (y64 + torch.log(-torch.expm1(-y64))).to(y.dtype)


def convert_weight(weight: torch.Tensor, init: Init, eps: float) -> torch.Tensor:
    """The non-negative target W' that the constrained layer starts from (softplus(V) == W').

    `abs`: |W| + eps (original study; flips negative weights). `clamp`: max(W, eps) (keeps
    positive weights exactly). Both are >= eps > 0 so V = softplus⁻¹(W') is finite.
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; known: {', '.join(INITS)}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    w = weight.detach()
    return w.abs() + eps if init == "abs" else w.clamp_min(eps)


class NonNegativeSoftplus(nn.Module):
    """Parametrization W = softplus(V) >= 0 (register on a Linear's `weight`).

    `right_inverse` makes `module.weight = W` (and registration itself) set V = softplus⁻¹(W)
    for a non-negative W; entries below `eps` (including exact zeros, which softplus cannot
    reach) are raised to `eps`. A negative W is an error, not a silent clamp: choosing how to
    convert signed weights is `convert_weight`'s documented job.

    Stateless in forward (one softplus), so `parametrize.cached()` computes it once per forward.
    """

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.eps = float(eps)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return F.softplus(v)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        if w.numel() and float(w.detach().min()) < 0:
            raise ValueError(
                f"NonNegativeSoftplus: assigned weight has negative entries (min {float(w.min()):.3g}); "
                "convert it first with convert_weight(w, init, eps)"
            )
        return inverse_softplus(w.detach().clamp_min(self.eps))

    def extra_repr(self) -> str:
        return f"eps={self.eps:g}"


# --------------------------------------------------------------------------- apply / inspect
def is_constrained_module(module: nn.Module) -> bool:
    """Whether `module.weight` is reparametrized: the one meaning of "constrained" everywhere.

    In monolm the parametrization is `NonNegativeSoftplus`. The training loop accepts any
    parametrization meant to keep the weight >= 0 (its tests use their own softplus and a broken
    one), and `min_constrained_weight` checks every such weight, so this does not look inside.
    """
    return parametrize.is_parametrized(module, "weight")


def is_constrained(model: nn.Module) -> bool:
    return any(is_constrained_module(m) for m in model.modules())


def constrained_targets(model: nn.Module) -> list[Target]:
    """The recognised targets of an already-constrained model (roles and blocks included)."""
    return [t for t in role_index(model) if is_constrained_module(t.module)]


def constrained_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(qualified weight name, materialized W = softplus(V)) for every constrained Linear. W is
    computed without autograd, but the generator yields outside `no_grad`: a yield inside it would
    switch autograd off in the caller's loop body, and for good if the caller stops early."""
    for name, module in model.named_modules():
        if is_constrained_module(module):
            with torch.no_grad():
                weight = module.weight.detach()
            yield f"{name}.weight", weight


class ConstraintViolation(ValueError):
    """A constrained weight is negative or non-finite, or a model that should be constrained has
    none: the arm no longer tests what it claims."""


def constrained_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every constrained module (`is_constrained_module`), in module order."""
    return [(name, m) for name, m in model.named_modules() if is_constrained_module(m)]


def min_constrained_weight(model: nn.Module) -> float:
    """Smallest materialized constrained weight, read from the real weights (the original study's
    check read none and logged +inf). Training calls it after every optimizer step, so all
    modules are reduced on the device and synchronised once. Raises `ConstraintViolation` naming
    the module if an entry is negative or non-finite, or if the model has no constrained weight."""
    mods = constrained_modules(model)
    if not mods:
        raise ConstraintViolation(f"{type(model).__name__} has no constrained weights")
    with torch.no_grad():
        extrema = torch.stack([torch.stack(torch.aminmax(m.weight.float())) for _, m in mods])  # [M, 2]
        lo = extrema[:, 0]
        bad = (lo < 0) | ~torch.isfinite(extrema).all(dim=1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ConstraintViolation(
                f"constrained weight {mods[i][0]}.weight has min {float(extrema[i, 0])}, "
                f"max {float(extrema[i, 1])} (must be finite and >= 0)"
            )
        return float(lo.min())


@dataclass
class ModuleRow:
    name: str
    role: str
    shape: list[int]
    n_params: int
    frac_negative_before: float
    min_before: float
    max_before: float
    min_after: float
    mean_abs_change: float
    rel_change: float  # ||W_after - W_before||_F / ||W_before||_F


@dataclass
class ConstraintSummary:
    variant: str
    init: str
    eps: float
    model_class: str
    n_modules: int
    constrained_params: int
    total_params: int
    share_of_params: float
    frac_negative_before: float  # over all constrained weights
    rel_change: float  # aggregate Frobenius relative change of the constrained weights
    modules: list[ModuleRow] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def apply_constraint(model: nn.Module, variant: str, init: Init = "abs", eps: float = 1e-6) -> ConstraintSummary:
    """Convert the `variant`'s Linear weights with `init` and register W = softplus(V) on them.

    In place; returns what was constrained and how much the conversion changed the weights.
    Refuses an already-constrained model (merge it first) so conversions never stack.
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; known: {', '.join(INITS)}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if is_constrained(model):
        raise ValueError(f"{type(model).__name__} is already constrained; merge() it before re-applying")
    targets = resolve_targets(model, variant)
    total = sum(p.numel() for p in model.parameters())
    rows: list[ModuleRow] = []
    neg = diff_sq = base_sq = 0.0
    for t in targets:
        lin = t.module
        with torch.no_grad():
            before = lin.weight.detach().clone()
            lin.weight.copy_(convert_weight(before, init, eps))
        parametrize.register_parametrization(lin, "weight", NonNegativeSoftplus(eps))
        with torch.no_grad():
            after = lin.weight.detach()
            b64, a64 = before.double(), after.double()
            d_sq = float(((a64 - b64) ** 2).sum())
            bs = float((b64**2).sum())
            n_neg = float((before < 0).sum())
        neg, diff_sq, base_sq = neg + n_neg, diff_sq + d_sq, base_sq + bs
        rows.append(
            ModuleRow(
                name=t.name,
                role=t.role,
                shape=list(before.shape),
                n_params=before.numel(),
                frac_negative_before=n_neg / before.numel(),
                min_before=float(before.min()),
                max_before=float(before.max()),
                min_after=float(after.min()),
                mean_abs_change=float((a64 - b64).abs().mean()),
                rel_change=(d_sq / bs) ** 0.5 if bs > 0 else float("inf"),
            )
        )
    n_constrained = sum(r.n_params for r in rows)
    return ConstraintSummary(
        variant=variant,
        init=init,
        eps=float(eps),
        model_class=type(model).__name__,
        n_modules=len(rows),
        constrained_params=n_constrained,
        total_params=total,
        share_of_params=n_constrained / total if total else 0.0,
        frac_negative_before=neg / n_constrained if n_constrained else 0.0,
        rel_change=(diff_sq / base_sq) ** 0.5 if base_sq > 0 else float("inf"),
        modules=rows,
    )


def merge(model: nn.Module) -> nn.Module:
    """Bake W = softplus(V) into plain `nn.Linear` weights (for export / HF `from_pretrained`).

    The merged model computes the same function but is no longer constrained during training.
    """
    for module in model.modules():
        if is_constrained_module(module):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


# --------------------------------------------------------------------------- save / load
def save_constrained(model: nn.Module, tokenizer: Any, out_dir: str | Path, spec: dict[str, Any]) -> Path:
    """Write a constrained model so that it reloads *still parametrized* (V, not W, is stored).

    Files: HF `config.json` (+ generation config), the tokenizer, `model.safetensors` of the
    parametrized state dict (keys `...parametrizations.weight.original`; tied tensors stored
    once via `safetensors.torch.save_model`), and `constraint.json` {variant, init, eps}. The
    folder is built beside `out_dir` and renamed into place, so readers never see half of it.
    """
    from safetensors.torch import save_model

    missing = {"variant", "init", "eps"} - set(spec)
    if missing:
        raise ValueError(f"constraint spec lacks {', '.join(sorted(missing))}")
    if not is_constrained(model):
        raise ValueError("save_constrained needs a constrained model (apply_constraint first)")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, existing="replace") as tmp:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        record = {
            "format": FORMAT_VERSION,
            "variant": spec["variant"],
            "init": spec["init"],
            "eps": float(spec["eps"]),
            "targets": [t.name for t in constrained_targets(model)],
        }
        (tmp / CONSTRAINT_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return out_dir


def read_constraint_spec(model_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(model_dir) / CONSTRAINT_FILE).read_text())


def _no_init_weights():
    try:  # its current home
        from transformers.initialization import no_init_weights
    except ImportError:  # its older home
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def load_constrained(model_dir: str | Path, device: str | torch.device | None = None) -> nn.Module:
    """Rebuild a model written by `save_constrained`: from its config, re-parametrized for the
    recorded variant, then loaded strictly (a missing or unexpected key is an error). fp32."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = Path(model_dir)
    spec = read_constraint_spec(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    # Random initialization is pure waste here (a strict load overwrites every parameter and
    # persistent buffer) and slow for a large model; skip it as `from_pretrained` does. The
    # uninitialized target weights are set to a finite value so the conversion in
    # apply_constraint is well defined before the load replaces V.
    with _no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # skipped with init_weights; a no-op unless config.tie_word_embeddings
    with torch.no_grad():
        for t in resolve_targets(model, spec["variant"]):
            t.module.weight.fill_(1.0)
    apply_constraint(model, spec["variant"], spec["init"], spec["eps"])
    names = [t.name for t in constrained_targets(model)]
    if "targets" in spec and names != spec["targets"]:
        raise ValueError(f"{model_dir}: constrained modules differ from the recorded ones")
    load_model(model, str(model_dir / WEIGHTS_FILE), strict=True)
    if device is not None:
        model.to(device)
    return model.eval()
