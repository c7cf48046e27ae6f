"""Quality controls: models that tell "more robust" apart from "more damaged" (issue 23).

A constrained model that is worse at its job is often less sensitive to an attack only because it
models text less sharply.

`controls.damage`: the baseline's final model with the same FFN matrices the variant constrains
perturbed by Gaussian noise, the noise scale bisected on the validation part until its validation
loss matches the constrained arm's within `tolerance` nats per token.

`controls.ladder`: reference models of the same architecture and tokenizer that span a range of
clean quality, evaluated and attacked exactly like the arms; the trend of loss increase against
clean loss they trace is what "a model of equal quality" would show (effective robustness,
Taori et al. 2020).
"""

from __future__ import annotations

import re

from pydantic import Field, model_validator

from monolm.config.base import PositiveFloat, PositiveInt, Strict

STEP_RUNG = re.compile(r"^step(\d+)$")  # a tiny model's pre-training snapshot: step<N>


class DamageConfig(Strict):
    """The damage-matched arm. `tolerance`: the largest |validation loss - target| (nats/token)
    that counts as matched; `max_steps`: validation evaluations the bisection may spend (the
    bracketing doublings included); `initial_scale`: the first noise scale tried, in units of each
    matrix's RMS; a run that ends outside the tolerance keeps its closest scale and says so."""

    enabled: bool = True
    tolerance: PositiveFloat = 0.02
    max_steps: PositiveInt = Field(default=16, le=64)
    initial_scale: PositiveFloat = 0.5


class LadderConfig(Strict):
    """`rungs` name the reference models, by source of the study's model: `hub`, revisions of
    the same model (Pythia: `step3000` ... `step143000`); `tiny`, stage 0's pre-training snapshots
    `step<N>` (each N one of `model.tiny.snapshot_steps`); `local`, model folders. The base model
    (the final pre-trained model) and the baseline are points of the ladder too."""

    enabled: bool = False
    rungs: list[str] = []

    @model_validator(mode="after")
    def _rungs(self) -> LadderConfig:
        if self.enabled and not self.rungs:
            raise ValueError("controls.ladder.rungs: an enabled ladder needs at least one rung")
        duplicates = sorted({r for r in self.rungs if self.rungs.count(r) > 1})
        if duplicates:
            raise ValueError(f"controls.ladder.rungs lists {', '.join(map(repr, duplicates))} more than once")
        return self


class ControlsConfig(Strict):
    """Every control of the study."""

    damage: DamageConfig = DamageConfig()
    ladder: LadderConfig = LadderConfig()


def climbs(ladder: LadderConfig, source: str) -> bool:
    """Whether the ladder is climbed: enabled, and the model was pre-trained (an architecture with
    random weights has no pre-training to take rungs from: its ladder is empty, not an error, so a
    preset's ladder does not stop a random-weights run)."""
    return ladder.enabled and source != "architecture"


class TinySnapshots(Strict):
    """The ladder's part of `model.tiny`: the pre-training steps at which stage 0 keeps a snapshot
    of the model (the tiny preset's rungs; part of the model's config, so stage 0's cache key)."""

    snapshot_steps: list[PositiveInt] = []


class LadderChecks(Strict):
    """The ladder's cross-section check of the whole config (`ExperimentConfig` derives from it)."""

    @model_validator(mode="after")
    def _ladder(self):
        check_ladder(self.controls.ladder, self.model)  # type: ignore[attr-defined]
        return self


def check_ladder(ladder: LadderConfig, model) -> None:
    """A tiny model's rungs must be snapshots stage 0 keeps (`step<N>`, N in
    `model.tiny.snapshot_steps`, N below `model.tiny.pretrain_steps`)."""
    if not climbs(ladder, model.source) or model.source != "tiny":
        return
    for rung in ladder.rungs:
        match = STEP_RUNG.match(rung)
        if match is None:
            raise ValueError(f"controls.ladder.rungs: {rung!r} is not step<N> (a tiny model's rungs are snapshots)")
        step = int(match.group(1))
        if step not in model.tiny.snapshot_steps or step >= model.tiny.pretrain_steps:
            raise ValueError(
                f"controls.ladder.rungs: {rung!r} is not a snapshot stage 0 keeps; allowed: steps in "
                f"model.tiny.snapshot_steps below model.tiny.pretrain_steps={model.tiny.pretrain_steps}"
            )
