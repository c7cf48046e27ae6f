"""The study as a grid: models x constraint variants x inits, each cell run for every seed.

A cell's configuration is the study's with one model, one variant and one init filled in; every
stage sees only a cell's configuration. Work that does not depend on the constraint (stage 0, the
baseline's training, evaluation and attacks) lands in the model's shared folders and is computed
once per (model, seed) for all of its cells (`monolm.study.layout`, `monolm.study.registry`).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

from monolm.config import ConfigError, ExperimentConfig, ModelConfig, build_config
from monolm.config.base import did_you_mean
from monolm.config.schema import GridConfig


@dataclass(frozen=True)
class Cell:
    """One (model, variant, init) of the study and its own configuration."""

    model: str
    variant: str
    init: str
    cfg: ExperimentConfig

    @property
    def label(self) -> str:
        """`<model>/<variant>-<init>`: how reports, folders and logs name the cell."""
        return f"{self.model}/{self.variant}-{self.init}"


def model_names(cfg: ExperimentConfig) -> list[str]:
    """The grid's model axis (the default model alone when it is not set)."""
    return list(cfg.grid.models) or [cfg.model.slug]


def model_config(cfg: ExperimentConfig, name: str) -> ModelConfig:
    """The model called `name`: a `models:` entry, or the default `model` by its own name."""
    if name in cfg.models:
        return cfg.models[name]
    if name == cfg.model.slug:
        return cfg.model
    known = [cfg.model.slug, *cfg.models]
    raise ConfigError(f"grid.models: unknown model {name!r}{did_you_mean(name, known)} (allowed: {', '.join(known)})")


def cell_config(cfg: ExperimentConfig, model: str, variant: str, init: str) -> ExperimentConfig:
    """The study's configuration for one cell, validated (a named model's own limits, e.g. its
    maximum sequence length, are checked here, before any compute)."""
    data = cfg.model_dump(mode="json")
    data["model"] = model_config(cfg, model).model_dump(mode="json")
    data["constraint"] = {**data["constraint"], "variant": variant, "init": init}
    data["models"], data["grid"] = {}, GridConfig().model_dump(mode="json")
    try:
        return build_config(data)
    except ConfigError as exc:
        raise ConfigError(f"grid cell {model}/{variant}-{init}: {exc}") from None


def cells(cfg: ExperimentConfig) -> list[Cell]:
    """Every cell of the study, models outermost (the order of reports and of the flow)."""
    variants = list(cfg.grid.variants) or [cfg.constraint.variant]
    inits = list(cfg.grid.inits) or [cfg.constraint.init]
    return [
        Cell(model, variant, init, cell_config(cfg, model, variant, init))
        for model, variant, init in product(model_names(cfg), variants, inits)
    ]


def grid_from_lists(
    models: list[str] | None, variants: list[str] | None, inits: list[str] | None
) -> dict[str, list[str]]:
    """The `grid:` section for axes given as lists (the CLI's --models/--variants/--inits, the
    flow's parameters): None leaves an axis to the preset; an empty list is refused."""
    grid: dict[str, list[str]] = {}
    for axis, values in (("models", models), ("variants", variants), ("inits", inits)):
        if values is None:
            continue
        if not values:
            raise ConfigError(f"grid.{axis}: an empty list; give at least one value or leave the axis out")
        grid[axis] = list(values)
    return grid
