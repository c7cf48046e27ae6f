"""`attacks`: the attacks' settings. UAT, HotFlip and GCG have fixed sections; an attack added with
`registry.register_attack` has its own section, validated by the model its `AttackSpec` names."""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, ValidationError, model_validator

from monolm.config.base import PositiveFloat, PositiveInt, Strict, Switch, did_you_mean
from monolm.config.gcg import GCGConfig
from monolm.study.registry import ATTACK_SPECS


class UATConfig(Strict):
    trigger_len: PositiveInt = 10
    top_k: PositiveInt = 100
    restarts: PositiveInt = 3
    max_sweeps: PositiveInt = 10
    n_opt_texts: PositiveInt = 80
    n_eval_texts: PositiveInt = 120
    text_max_tokens: PositiveInt = 128
    grad_batch_size: PositiveInt = 16
    score_batch_size: PositiveInt = 128  # candidate sequences per forward; halves on OOM
    # The threat model GCG shares (monolm.attacks.typeable): a trigger is text an attacker can type.
    allow_non_ascii: bool = False  # non-ASCII tokens are filtered out by default (special ones always)
    filter_ids: bool = True  # only triggers whose decode/re-encode gives back the same ids


class HotFlipConfig(Strict):
    max_flips: PositiveInt = 10
    top_b: PositiveInt = 64  # candidates re-scored exactly per flip
    n_texts: PositiveInt = 120
    text_max_tokens: PositiveInt = 64
    block_size: PositiveInt = 10  # examples per resumable unit
    score_batch_size: PositiveInt = 128
    random_control: bool = True  # query-only greedy search with random candidates


class AttackConfig(Strict):
    """The attacks' settings. An attack added with `registry.register_attack` has its section here
    too (`attacks.<name>`), validated by its own model (`AttackSpec.settings`); other names are refused."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    success_threshold: PositiveFloat = 0.15  # relative loss increase that counts as a success
    bf16: Switch = "auto"  # autocast compute; on CUDA only, fp32 elsewhere
    uat: UATConfig = UATConfig()
    hotflip: HotFlipConfig = HotFlipConfig()
    gcg: GCGConfig = GCGConfig()

    @model_validator(mode="before")
    @classmethod
    def _registered_sections(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        extra = {n: a.settings for n, a in ATTACK_SPECS.items() if a.settings is not None}
        for key in data:
            if key not in cls.model_fields and key not in extra:
                known = [*cls.model_fields, *extra]
                hint = did_you_mean(key, known) or f" (known under attacks: {', '.join(known)})"
                raise ValueError(f"attacks.{key}: unknown setting{hint}")
        return {**data, **{n: _section(n, model, data.get(n, {})) for n, model in extra.items()}}


def _section(name: str, model: Any, value: Any) -> Any:
    """A registered attack's section validated by its model, each problem naming its field."""
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        problems = [f"attacks.{name}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise ValueError("; ".join(problems)) from None
