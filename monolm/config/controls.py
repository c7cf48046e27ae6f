"""Controls: reference models that tell robustness apart from damage.

A constrained model that is worse at its job is often less sensitive to an attack only because it
models text less sharply. The quality ladder (`controls.ladder`) is a set of reference models of
the same architecture and tokenizer that span a range of clean quality; they are evaluated and
attacked exactly like the arms, and the trend of loss increase against clean loss they trace is
what "a model of equal quality" would show (effective robustness, Taori et al. 2020).
"""

from __future__ import annotations

import re

from pydantic import model_validator

from monolm.config.base import Strict

STEP_RUNG = re.compile(r"^step(\d+)$")  # a tiny model's pre-training snapshot: step<N>


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
    """Every control of the study (each off unless a preset or the user turns it on)."""

    ladder: LadderConfig = LadderConfig()


def climbs(ladder: LadderConfig, source: str) -> bool:
    """Whether the ladder is climbed: enabled, and the model was pre-trained (an architecture with
    random weights has no pre-training to take rungs from: its ladder is empty, not an error, so a
    preset's ladder does not stop a random-weights run)."""
    return ladder.enabled and source != "architecture"


def check_ladder(ladder: LadderConfig, source: str, snapshot_steps: list[int], pretrain_steps: int) -> None:
    """A tiny model's rungs must be snapshots stage 0 keeps (`step<N>`, N in
    `model.tiny.snapshot_steps`, N below `model.tiny.pretrain_steps`); an architecture with random
    weights has no ladder to climb."""
    if not climbs(ladder, source) or source != "tiny":
        return
    for rung in ladder.rungs:
        match = STEP_RUNG.match(rung)
        if match is None:
            raise ValueError(f"controls.ladder.rungs: {rung!r} is not step<N> (a tiny model's rungs are snapshots)")
        step = int(match.group(1))
        if step not in snapshot_steps or step >= pretrain_steps:
            raise ValueError(
                f"controls.ladder.rungs: {rung!r} is not a snapshot stage 0 keeps; allowed: steps in "
                f"model.tiny.snapshot_steps below model.tiny.pretrain_steps={pretrain_steps}"
            )
