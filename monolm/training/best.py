"""The best model of a run: `out_dir/best/` with the weights and `best.json` (step, metrics, file
digests, run fingerprint), written atomically, read back only when intact and this run's own, and
recreated exactly by replaying training when it was lost."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import save_model as _save_safetensors_model
from torch import nn

from monolm.core.artifacts import (
    CorruptArtifact,
    atomic_dir,
    atomic_write_json,
    read_json,
    recover_replaced,
    sha256_file,
)
from monolm.training.checkpoint import check_fingerprint, list_checkpoints, move_aside, verify_checkpoint

log = logging.getLogger(__name__)

BEST_DIR = "best"
BEST_MARKER = "best.json"

SaveModel = Callable[[nn.Module, Path], list[str]]


def default_save_model(model: nn.Module, directory: Path) -> list[str]:
    """The state_dict as `model.safetensors`; returns the files written (relative to `directory`)."""
    _save_safetensors_model(model, str(directory / "model.safetensors"))
    return ["model.safetensors"]


def save_best(
    out_dir: Path,
    model: nn.Module,
    save_model: SaveModel,
    *,
    step: int,
    metrics: dict[str, Any],
    fingerprint_digest: str,
) -> None:
    """Replace `best/` atomically; `best.json` (written last) records step, metrics, digests."""
    with atomic_dir(out_dir / BEST_DIR, existing="replace") as tmp:
        files = save_model(model, tmp)
        digests = {rel: sha256_file(tmp / rel) for rel in files}
        atomic_write_json(
            tmp / BEST_MARKER, {"step": step, "metrics": metrics, "files": digests, "fingerprint": fingerprint_digest}
        )


def read_best(out_dir: Path, fingerprint_digest: str) -> dict[str, Any] | None:
    """The best model's marker if `best/` is intact and belongs to this run, else None."""
    best = out_dir / BEST_DIR
    recover_replaced(best)
    marker = best / BEST_MARKER
    if not marker.is_file():
        return None
    try:
        info = read_json(marker)
        if info.get("fingerprint") != fingerprint_digest:
            log.warning("ignoring %s: written by a different model/recipe/run", best)
            return None
        for rel, digest in info["files"].items():
            if not (best / rel).is_file() or sha256_file(best / rel) != digest:
                raise CorruptArtifact(best / rel, "missing or sha256 differs from best.json")
    except (CorruptArtifact, KeyError, TypeError) as exc:
        log.warning("ignoring best model in %s: %s", best, exc)
        return None
    return info


def replay_point_for_lost_best(
    out_dir: Path, ckpt_root: Path, latest: Path, fingerprint: dict[str, Any]
) -> Path | None:
    """The checkpoint to resume from when the best model this run already selected is missing or
    damaged: the newest valid one *before* the recorded best step (None: from the start).

    A damaged best model must never be re-blessed by a finished run. Resuming is exact, so
    replaying from before the best step re-selects and rewrites the very same best model (its
    evaluation is the minimum over all evaluations, hence over the replayed ones). Checkpoints
    after the replay point are moved aside; they are re-written identically by the replay.
    """
    # Another model's/recipe's checkpoints are refused (CheckpointMismatch), never replayed over.
    check_fingerprint(verify_checkpoint(latest)["fingerprint"], fingerprint, latest)
    recorded = json.loads((latest / "state.json").read_text())["train"]["history"]["summary"].get("best_step")
    if recorded is None:
        return latest  # no best model was selected yet: nothing to recreate
    point = None
    for step_no, path in reversed(list_checkpoints(ckpt_root)):
        if step_no >= recorded:
            continue
        try:
            verify_checkpoint(path)
        except (CorruptArtifact, OSError) as exc:
            log.warning("skipping checkpoint %s: %s", path, exc)
            continue
        point = path
        break
    log.warning(
        "%s: the best model (step %d) is missing or damaged; replaying from %s to recreate it exactly",
        out_dir,
        recorded,
        point if point is not None else "the start",
    )
    if (out_dir / BEST_DIR).exists():
        move_aside(out_dir / BEST_DIR, "missing or damaged files; recreated by replaying training")
    replay_from = point.name if point else "the start"
    for step_no, path in list_checkpoints(ckpt_root):
        if point is None or step_no > int(point.name.split("-")[1]):
            move_aside(path, f"superseded: replaying from {replay_from} to recreate the best model")
    return point
