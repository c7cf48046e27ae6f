"""Where a run cell writes: the one function that decides every stage folder.

A cell is one seed of one configuration (preset, model, constraint variant). Its folders are
resolved once, by `cell_paths`, into an immutable `CellPaths` that the pipeline, the stage
functions, the Prefect tasks and the cache policy are handed; none of them builds a path from the
config. A change of folder layout is a change of `cell_paths` alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from monolm.stages.registry import SEED_STAGE_NAMES, stage

if TYPE_CHECKING:
    from monolm.config import ExperimentConfig


@dataclass(frozen=True)
class CellPaths:
    """The folders of one cell: `root` (what a per-cell lock guards) and one folder per stage."""

    seed: int
    root: Path
    dirs: Mapping[str, Path] = field(repr=False)

    def stage(self, name: str) -> Path:
        """The folder of per-seed stage `name`."""
        if name not in self.dirs:
            stage(name)  # an unknown name: ValueError listing the known stages
            raise ValueError(f"stage {name!r} has no per-seed folder")
        return self.dirs[name]


def cell_paths(cfg: ExperimentConfig, seed: int) -> CellPaths:
    """`<runs_root>/<preset>/<model-slug>/<variant>/seed-<n>/<stage>/` for every per-seed stage."""
    root = Path(cfg.paths.runs_root) / cfg.preset / cfg.model.slug / cfg.constraint.variant / f"seed-{seed}"
    return CellPaths(seed, root, MappingProxyType({name: root / name for name in SEED_STAGE_NAMES}))
