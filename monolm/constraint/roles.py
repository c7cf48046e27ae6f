"""Which Linears a constraint variant names: roles (FFN input/output, gated gate/up/down,
attention output) resolved from the model's structure (blocks recognised by class and children),
never by substring matches on parameter names. The variants' table is in
`monolm.constraint.softplus`, which applies the constraint to what this module finds.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# variant -> the roles it constrains. Roles are resolved structurally by `role_index`.
VARIANT_ROLES: dict[str, tuple[str, ...]] = {
    "mlp_in": ("mlp_in",),
    "mlp_both": ("mlp_in", "mlp_out"),
    "mlp_in_attn_out": ("mlp_in", "attn_out"),
    "gated_updown": ("mlp_up", "mlp_down"),
    "gated_all": ("mlp_gate", "mlp_up", "mlp_down"),
}
# Non-gated FFN (input, output) child names of known architectures, most specific first.
_MLP_PAIRS: tuple[tuple[str, str], ...] = (
    ("dense_h_to_4h", "dense_4h_to_h"),  # GPT-NeoX / Pythia
    ("fc_in", "fc_out"),  # GPT-J
    ("fc1", "fc2"),  # Phi, CLIP-style MLPs
    ("c_fc", "c_proj"),  # GPT-2 naming (Conv1D there, so only matched when they are Linear)
    ("up_proj", "down_proj"),  # non-gated up/down MLPs
)
_GATED = ("gate_proj", "up_proj", "down_proj")  # Llama / Mistral / Qwen style SwiGLU
_ATTN_OUT = ("dense", "o_proj", "out_proj", "c_proj")  # GPT-NeoX, Llama, OPT/BART, GPT-2 naming


@dataclass
class Target:
    """One Linear to constrain: its qualified name, the module, its role and enclosing block."""

    name: str
    module: nn.Linear
    role: str
    block_name: str
    block: nn.Module


def _linear_child(module: nn.Module, attr: str) -> nn.Linear | None:
    child = getattr(module, attr, None)
    return child if isinstance(child, nn.Linear) else None


def _is_attention(module: nn.Module) -> bool:
    return "Attention" in type(module).__name__


def _is_mlp_class(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return name.endswith("mlp") or "feedforward" in name


def mlp_roles(module: nn.Module) -> dict[str, str] | None:
    """role -> child attribute for an FFN block, or None if `module` is not one."""
    gated = {attr: _linear_child(module, attr) for attr in _GATED}
    if all(gated.values()):
        return {"mlp_gate": "gate_proj", "mlp_up": "up_proj", "mlp_down": "down_proj"}
    if not _is_mlp_class(module):
        return None
    for a_in, a_out in _MLP_PAIRS:
        if _linear_child(module, a_in) is not None and _linear_child(module, a_out) is not None:
            return {"mlp_in": a_in, "mlp_out": a_out}
    # Structural fallback: exactly two Linear children that chain (in -> out).
    linears = [(n, c) for n, c in module.named_children() if isinstance(c, nn.Linear)]
    if len(linears) == 2 and linears[0][1].out_features == linears[1][1].in_features:
        return {"mlp_in": linears[0][0], "mlp_out": linears[1][0]}
    return None


def role_index(model: nn.Module) -> list[Target]:
    """Every Linear whose role we can recognise, in module order.

    FFN blocks: modules with Linear `gate_proj`/`up_proj`/`down_proj` (gated), or whose class
    name ends in "MLP" with a known (input, output) pair of Linear children. Attention blocks:
    class name containing "Attention" with a Linear output projection child.
    """
    found: list[Target] = []
    for block_name, block in model.named_modules():
        roles = mlp_roles(block)
        if roles is None and _is_attention(block):
            attr = next((a for a in _ATTN_OUT if _linear_child(block, a) is not None), None)
            roles = {"attn_out": attr} if attr else None
        if not roles:
            continue
        for role, attr in roles.items():
            qual = f"{block_name}.{attr}" if block_name else attr
            found.append(Target(qual, getattr(block, attr), role, block_name, block))
    return found


def resolve_targets(model: nn.Module, variant: str) -> list[Target]:
    """The Linears `variant` constrains in `model`; a ValueError names the variant and model
    class when the variant is unknown or any of its roles matches no module."""
    if variant not in VARIANT_ROLES:
        raise ValueError(f"unknown constraint variant {variant!r}; known: {', '.join(VARIANT_ROLES)}")
    wanted = VARIANT_ROLES[variant]
    index = role_index(model)
    targets = [t for t in index if t.role in wanted]
    missing = [r for r in wanted if not any(t.role == r for t in targets)]
    if missing:
        present = sorted({t.role for t in index})
        hint = ""
        if "mlp_gate" in present and variant in ("mlp_in", "mlp_both", "mlp_in_attn_out"):
            hint = "; this model has gated MLPs, use gated_updown or gated_all"
        elif "mlp_in" in present and variant.startswith("gated_"):
            hint = "; this model has non-gated MLPs, use mlp_in, mlp_both or mlp_in_attn_out"
        raise ValueError(
            f"constraint variant {variant!r} matches no module for role(s) {', '.join(missing)} in "
            f"{type(model).__name__} (roles found: {', '.join(present) or 'none'}){hint}"
        )
    return targets
