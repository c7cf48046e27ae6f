"""Where each rung of the quality ladder comes from: the same architecture and tokenizer as the
study's model, at a range of clean quality.

* hub model: a revision of the same repository (Pythia publishes `step1000` ... `step143000`),
  fetched like the base model with that revision;
* tiny model: a pre-training snapshot stage 0 kept (`step<N>`, no extra training);
* local model: a saved model folder.

The base model itself (the final pre-trained model) is always a point of the ladder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from monolm.config import ExperimentConfig
from monolm.study.frame import StageRef

BASE = "base"  # the ladder's name for the base model


@dataclass(frozen=True)
class Rung:
    """One reference model: its name in reports and folders, and where its weights are."""

    name: str
    path: Path


def rung_folder_name(rung: str) -> str:
    """A rung's folder name inside the ladder stage (a local rung is a path)."""
    return rung.rstrip("/").replace("/", "--").replace(":", "-").lstrip(".") or "rung"


def resolve_rungs(cfg: ExperimentConfig, setup: StageRef) -> list[Rung]:
    """Every configured rung, located (hub revisions fetched), then the base model."""
    from monolm.models import loading as models

    source = cfg.model.source
    rungs: list[Rung] = []
    for rung in cfg.controls.ladder.rungs:
        if source == "tiny":
            snapshots = setup.metrics.get("snapshots") or {}
            if rung not in snapshots:
                raise ValueError(
                    f"controls.ladder.rungs: stage 0 kept no snapshot {rung!r} "
                    f"(kept: {', '.join(snapshots) or 'none'}); "
                    "add its step to model.tiny.snapshot_steps"
                )
            path = Path(snapshots[rung])
        elif source == "hub":
            path = models.fetch_hub_model(cfg.model.name, rung, cfg.hf_cache_dir)
        else:
            path = Path(rung).expanduser().resolve()
            if not (path / "config.json").is_file():
                raise models.ModelError(f"controls.ladder.rungs: {rung!r} is not a saved model directory")
        rungs.append(Rung(rung_folder_name(rung), Path(path)))
    return [*rungs, Rung(BASE, Path(setup.metrics["model_dir"]))]
