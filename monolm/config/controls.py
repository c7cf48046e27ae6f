"""Quality controls: arms that are not trained but tell "more robust" apart from "more damaged".

`controls.damage` (issue 23): the baseline's final model with the same FFN matrices the variant
constrains perturbed by Gaussian noise, the noise scale bisected on the validation part until its
validation loss matches the constrained arm's within `tolerance` nats per token.
"""

from __future__ import annotations

from pydantic import Field

from monolm.config.base import PositiveFloat, PositiveInt, Strict


class DamageConfig(Strict):
    """The damage-matched arm. `tolerance`: the largest |validation loss - target| (nats/token)
    that counts as matched; `max_steps`: validation evaluations the bisection may spend (the
    bracketing doublings included); `initial_scale`: the first noise scale tried, in units of each
    matrix's RMS; a run that ends outside the tolerance keeps its closest scale and says so."""

    enabled: bool = True
    tolerance: PositiveFloat = 0.02
    max_steps: PositiveInt = Field(default=16, le=64)
    initial_scale: PositiveFloat = 0.5


class ControlsConfig(Strict):
    damage: DamageConfig = DamageConfig()
