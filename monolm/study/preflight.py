"""What can be refused about a study before any compute: each cell of the grid, folders of the
earlier layout, and each constraint variant against its model's architecture (known without a
download); and the variants an architecture has (`--variants all`)."""

from __future__ import annotations

from torch import nn

from monolm.config import VARIANTS, ConfigError, ExperimentConfig
from monolm.constraint.softplus import resolve_targets
from monolm.models.shape import check_variant, skeleton, transformers_config
from monolm.study.cells import Cell, cells, model_config, model_names
from monolm.study.layout import earlier_layout


def check_study(cfg: ExperimentConfig) -> list[Cell]:
    """Everything about the grid that can be refused before any compute: each cell's own
    configuration, folders left by the earlier per-variant layout, and each variant against its
    model's architecture where that is known without a download. Returns the cells."""
    study = cells(cfg)
    for cell in study:
        old = earlier_layout(cell.cfg)
        if old:
            raise ConfigError(
                f"{old[0].parent} holds a run of monolm's earlier per-variant layout (every stage of a seed, the "
                f"baseline's too, in {old[0].name}/); this version keeps the stages that do not depend on the "
                f"constraint in {old[0].parent.parent / 'shared'} and the rest in "
                f"{old[0].parent.parent / f'{cell.variant}-{cell.init}'}, so it would recompute every stage. "
                f"Move the old folder away (e.g. `mv {old[0].parent} {old[0].parent}.v1`) or set paths.runs_root "
                "to another folder; nothing was computed"
            )
        check_variant(cell.cfg)
    return study


def applicable_variants(cfg: ExperimentConfig) -> list[str]:
    """Every constraint variant the architecture of the study's model(s) has (`--variants all`),
    in the order of `VARIANTS`; a model whose architecture is not known without a download is
    refused, naming it (list the variants instead)."""
    fitting = list(VARIANTS)
    for name in model_names(cfg):
        single = cfg.model_copy(update={"model": model_config(cfg, name)})
        config = transformers_config(single)
        if config is None:
            raise ConfigError(
                f"variants=all: the architecture of model {name!r} is not known before it is downloaded; "
                f"name the variants (allowed: {', '.join(VARIANTS)})"
            )
        model = skeleton(config)
        fitting = [v for v in fitting if _fits(model, v)]
    return fitting


def _fits(model: nn.Module, variant: str) -> bool:
    try:
        resolve_targets(model, variant)
    except ValueError:
        return False
    return True
