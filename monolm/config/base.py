"""What every part of the configuration shares: the strict base model, the error type, and the
small value types (positive numbers, switches, variants, inits, folder-safe names)."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, Literal

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
RUN_NAME_MAX = 150  # the store's run_id is the name, '-', and a 16-hex digest, in a String(200)


def check_run_name(value: str | None) -> str | None:
    """The run name names the folder under `paths.results_root` that stage 7 replaces: no path
    separators, globs (`*`), hidden or relative names. The value is not echoed (it may be anything)."""
    if value is not None and (len(value) > RUN_NAME_MAX or not FOLDER_NAME.match(value)):
        raise ValueError(
            "run_name: not a folder name; allowed: letters, digits, '.', '_', '-', starting with a "
            f"letter or digit, at most {RUN_NAME_MAX} characters"
        )
    return value


class ConfigError(ValueError):
    """A configuration problem, phrased for the user: field path, bad value, what is allowed."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


NOT_STUDY = ("run_name", "paths", "runner")  # sections that do not change a run's numbers


def study_digest_of(dump: dict[str, Any]) -> str:
    """`ExperimentConfig.study_digest` of a dumped config (a results folder's manifest)."""
    payload = {k: v for k, v in dump.items() if k not in NOT_STUDY}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
