"""The typed configuration: every field, its default (the `full` paper run) and its checks.

Errors name the field, the value and what is allowed (`ConfigError`), because a typo discovered
after six GPU-hours of training is a lost day.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from monolm.config.attacks import AttackConfig, HotFlipConfig, UATConfig  # noqa: F401  (re-exported)
from monolm.config.base import (  # noqa: F401  (re-exported: the value types are part of the schema)
    FOLDER_NAME,
    INITS,
    VARIANTS,
    ConfigError,
    Fraction,
    Init,
    NonNegInt,
    PositiveFloat,
    PositiveInt,
    Strict,
    Switch,
    Variant,
    check_run_name,
    study_digest_of,
)
from monolm.config.controls import ControlsConfig, DamageConfig, LadderChecks, TinySnapshots  # noqa: F401
from monolm.config.cross_checks import check_experiment, check_seq_len
from monolm.config.gcg import GCGConfig  # noqa: F401  (re-exported)
from monolm.config.model_data import (  # noqa: F401  (re-exported)
    HELD_OUT_PARTS,
    ContaminationConfig,
    DataConfig,
    ModelConfig,
    TinyModelConfig,
)
from monolm.config.runner import RunnerConfig, SlurmConfig  # noqa: F401  (re-exported)
from monolm.config.store_url import without_password


# --------------------------------------------------------------------------- constraint
class ConstraintConfig(Strict):
    variant: Variant = "mlp_in"
    # How pretrained W becomes V with softplus(V) ~ W >= 0:
    #   abs:   V = softplus^-1(|W| + eps)   (the original study's choice; flips negative weights)
    #   clamp: V = softplus^-1(max(W, eps)) (keeps positive weights, sends negative ones to ~0)
    init: Init = "abs"
    eps: PositiveFloat = 1e-6
    drift_docs: PositiveInt = 64  # held-out docs for the function-drift measurement
    monotonicity_pairs: PositiveInt = 512  # sampled x <= x' pairs per constrained sublayer


# --------------------------------------------------------------------------- training
class ArmConfig(Strict):
    """Everything that defines one training arm's recipe."""

    lr: PositiveFloat = 5e-5
    epochs: PositiveFloat = 1.0
    max_steps: PositiveInt | None = None  # caps optimizer steps (token budget) when set
    warmup_ratio: Fraction = 0.1
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: Fraction = 0.1
    weight_decay: Annotated[float, Field(ge=0)] = 0.01  # AdamW; never on biases and LayerNorm weights
    # The constrained arm's W = softplus(V): "none" leaves V undecayed; "materialized" decays W
    # itself towards 0 (W <- (1 - lr * weight_decay) W, V recomputed), as the baseline's W is.
    # Decaying V instead would pull W towards softplus(0) = ln 2.
    constrained_weight_decay: Literal["none", "materialized"] = "none"
    grad_clip: PositiveFloat | None = 1.0
    adam_beta1: Fraction = 0.9
    adam_beta2: Fraction = 0.95
    micro_batch_size: PositiveInt = 4
    grad_accum_steps: PositiveInt = 8  # effective batch = micro_batch_size * grad_accum_steps
    gradient_checkpointing: Switch = "auto"
    bf16: Switch = "auto"  # autocast compute only; parameters and optimizer state stay fp32
    log_every_steps: PositiveInt = 10
    eval_every_steps: PositiveInt = 200
    eval_max_docs: PositiveInt = 200  # validation documents per evaluation (at most data.n_val_docs)
    checkpoint_every_steps: PositiveInt = 200
    checkpoint_every_minutes: PositiveFloat = 30.0
    keep_last_checkpoints: PositiveInt = 2

    @property
    def effective_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps


class ArmOverride(Strict):
    """Per-arm deviations from `training.common`; only allowed when the recipe says so."""

    lr: PositiveFloat | None = None
    epochs: PositiveFloat | None = None
    max_steps: PositiveInt | None = None
    warmup_ratio: Fraction | None = None
    schedule: Literal["cosine", "linear", "constant"] | None = None


class TrainingConfig(Strict):
    # fair: both arms get identical data, budget, optimizer and schedule (the default).
    # reference: the original study's asymmetric recipe. asymmetric: any other per-arm recipe.
    recipe: Literal["fair", "reference", "asymmetric"] = "fair"
    common: ArmConfig = ArmConfig()
    baseline: ArmOverride = ArmOverride()
    monotonic: ArmOverride = ArmOverride()

    @model_validator(mode="after")
    def _fairness(self) -> TrainingConfig:
        if self.recipe == "fair":
            for arm in ("baseline", "monotonic"):
                for field, value in getattr(self, arm).model_dump(exclude_none=True).items():
                    raise ValueError(
                        f"training.{arm}.{field}={value!r} gives one arm its own recipe, but "
                        "training.recipe='fair' requires identical arms; set it in "
                        "training.common, or set training.recipe='asymmetric' (reported as such)"
                    )
        return self

    def arm(self, name: Literal["baseline", "monotonic"]) -> ArmConfig:
        """The resolved recipe of one arm: common settings updated with its overrides."""
        overrides = getattr(self, name).model_dump(exclude_none=True)
        return self.common.model_copy(update=overrides)


# --------------------------------------------------------------------------- evaluation, attacks
class EvalConfig(Strict):
    max_docs: PositiveInt = 500
    batch_size: PositiveInt = 8
    seq_len: PositiveInt | None = None  # window length; None -> data.seq_len
    bf16: Switch = "auto"  # autocast compute; on CUDA only, fp32 elsewhere


# --------------------------------------------------------------------------- paths and runners
class PathsConfig(Strict):
    runs_root: Path = Path("runs")
    results_root: Path = Path("results")
    cache_dir: Path = Path(".state/cache")
    # SQLAlchemy URL of the results store; None -> sqlite:///<runs_root>/results.sqlite. A password
    # in it moves to the environment (`monolm.config.store_url`): never logged, stored or passed on.
    store_url: str | None = None

    @field_validator("store_url")
    @classmethod
    def _no_password(cls, value: str | None) -> str | None:
        return value if value is None else without_password(value)


# --------------------------------------------------------------------------- the study's grid
class GridConfig(Strict):
    """The axes of a study: models x constraint variants x inits (x seeds). An empty list means the
    single value of `model`, `constraint.variant` or `constraint.init`, so a config without a
    grid is a grid of one cell."""

    models: list[str] = []  # names: keys of `models:`, or the default model's own name (its slug)
    variants: list[Variant] = []
    inits: list[Init] = []


# --------------------------------------------------------------------------- the whole thing
class ExperimentConfig(LadderChecks):
    preset: str = "full"
    run_name: str | None = None
    seeds: list[NonNegInt] = [42, 1337, 2024, 8888, 12345]  # folder names seed-<n>; numpy seeds are >= 0
    model: ModelConfig = ModelConfig()
    models: dict[str, ModelConfig] = {}  # named models for the grid's model axis (grid.models)
    grid: GridConfig = GridConfig()
    data: DataConfig = DataConfig()
    constraint: ConstraintConfig = ConstraintConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvalConfig = EvalConfig()
    attacks: AttackConfig = AttackConfig()
    controls: ControlsConfig = ControlsConfig()
    paths: PathsConfig = PathsConfig()
    runner: RunnerConfig = RunnerConfig()

    @field_validator("run_name")
    @classmethod
    def _run_name(cls, value: str | None) -> str | None:
        return check_run_name(value)

    @model_validator(mode="after")
    def _cross_field(self) -> ExperimentConfig:
        check_experiment(self)  # the checks that span sections (monolm.config.cross_checks)
        return self

    def validate_seq_len(self, model_max: int) -> None:
        """Refuse sequence lengths the model cannot attend over (checked again once the model's
        own config is known, before any compute)."""
        check_seq_len(self, model_max)

    @property
    def default_run_name(self) -> str:
        """`<study name>-<study digest, 8 hex>`: the results folder of a run named by no one; two
        differently configured runs (another learning rate, ...) never share it."""
        return f"{self.study_name}-{self.study_digest()[:8]}"

    @property
    def study_name(self) -> str:
        """`<preset>-<model>-<variant>-<recipe>-seeds-<a>-<b>`, the preset left out when the model's
        name starts with it (`tiny-neox-...`); the runs of a study differ in the digest suffix."""
        seeds = "-".join(str(s) for s in self.seeds)
        slug = "+".join(self.grid.models) or self.model.slug
        head = slug if slug == self.preset or slug.startswith(f"{self.preset}-") else f"{self.preset}-{slug}"
        variants = "+".join(self.grid.variants) or self.constraint.variant
        inits = "+".join(self.grid.inits)
        return f"{head}-{variants}{f'-{inits}' if inits else ''}-{self.training.recipe}-seeds-{seeds}"

    @property
    def eval_seq_len(self) -> int:
        return self.evaluation.seq_len or self.data.seq_len

    @property
    def store_url(self) -> str:
        return self.paths.store_url or f"sqlite:///{(self.paths.runs_root / 'results.sqlite').resolve()}"

    @property
    def hf_cache_dir(self) -> Path:
        return self.model.cache_dir or (self.paths.cache_dir / "hf")

    def subset(self, *sections: str) -> dict[str, Any]:
        """A JSON-able slice of the config (dotted section names), used for manifests and cache
        keys: a stage's key contains exactly the sections that change its output."""
        dump = self.model_dump(mode="json")
        out: dict[str, Any] = {}
        for section in sections:
            node: Any = dump
            for part in section.split("."):
                node = node[part]
            out[section] = node
        return out

    def study_digest(self) -> str:
        """Digest of what decides the numbers: the config without run name, paths and runner."""
        return study_digest_of(self.model_dump(mode="json"))

    def digest(self, *sections: str) -> str:
        payload = self.subset(*sections) if sections else self.model_dump(mode="json")
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
