"""What every part of the configuration shares: the strict base model, the error type, and the
small value types (positive numbers, switches, variants, inits, folder-safe names)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

PositiveInt = Annotated[StrictInt, Field(gt=0)]
NonNegInt = Annotated[StrictInt, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Switch = Literal["auto", "on", "off"]  # auto: on for CUDA only (bf16 autocast, gradient checkpointing)

VARIANTS = ("mlp_in", "mlp_both", "mlp_in_attn_out", "gated_updown", "gated_all")
Variant = Literal["mlp_in", "mlp_both", "mlp_in_attn_out", "gated_updown", "gated_all"]
INITS = ("abs", "clamp")
Init = Literal["abs", "clamp"]
FOLDER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a name that is also a folder name


class ConfigError(ValueError):
    """A configuration problem, phrased for the user: field path, bad value, what is allowed."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)
