"""Where a run cell writes: the one function that decides every stage folder.

A cell is one seed of one (model, constraint variant, init) of the study. Its folders are
resolved once, by `cell_paths`, into an immutable `CellPaths` that the pipeline, the stage
functions, the Prefect tasks and the cache policy are handed; none of them builds a path from the
config. A change of folder layout is a change of `cell_paths` alone.

    <runs_root>/<preset>/<model>/shared/seed-<n>/<stage>           stages that do not depend on the
                                                                   constraint: shared by all cells
    <runs_root>/<preset>/<model>/<variant>-<init>/seed-<n>/<stage> the cell's own stages
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from monolm.study.registry import seed_stages, stage

if TYPE_CHECKING:
    from monolm.config import ExperimentConfig

SHARED = "shared"  # the folder of a model's constraint-independent stages


@dataclass(frozen=True)
class CellPaths:
    """The folders of one cell: `root` (the cell's own stages), `shared` (its model's
    constraint-independent stages, the same for every cell of that model and seed), and one
    folder per stage."""

    seed: int
    root: Path
    shared: Path
    dirs: Mapping[str, Path] = field(repr=False)

    def stage(self, name: str) -> Path:
        """The folder of per-seed stage `name`."""
        if name not in self.dirs:
            stage(name)  # an unknown name: ValueError listing the known stages
            raise ValueError(f"stage {name!r} has no per-seed folder")
        return self.dirs[name]


def model_dir(cfg: ExperimentConfig) -> Path:
    """`<runs_root>/<preset>/<model>`: every folder of one model of the study."""
    return Path(cfg.paths.runs_root) / cfg.preset / cfg.model.slug


def cell_paths(cfg: ExperimentConfig, seed: int) -> CellPaths:
    """The folders of `cfg`'s cell (one model, variant and init) for `seed`."""
    shared = model_dir(cfg) / SHARED / f"seed-{seed}"
    root = model_dir(cfg) / f"{cfg.constraint.variant}-{cfg.constraint.init}" / f"seed-{seed}"
    dirs = {s.name: (shared if s.scope == "model" else root) / s.name for s in seed_stages()}
    return CellPaths(seed, root, shared, MappingProxyType(dirs))


def earlier_layout(cfg: ExperimentConfig) -> list[Path]:
    """Seed folders of monolm's earlier per-variant layout (every stage, the baseline's too, under
    `<model>/<variant>/seed-<n>/`) for this config's model and variant: a run refuses to start
    over them rather than leave half of a study in each layout."""
    old = model_dir(cfg) / cfg.constraint.variant
    return sorted(p for p in old.glob("seed-*") if (p / "setup").is_dir()) if old.is_dir() else []
