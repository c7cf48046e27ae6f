"""Training checkpoints that a preempted job can trust and resume from *exactly*.

Why this shape:
- A checkpoint is a directory `step-<8 digits>/` that appears in one `os.replace` (it is written
  into a temp directory first), so a killed writer leaves only a `.tmp-*` directory, never a
  half-checkpoint under a real name.
- `checkpoint.json` is written last and lists every file's sha256: a directory without it is
  incomplete, a file that no longer matches it was truncated or altered. `latest_valid_checkpoint`
  walks newest -> oldest and skips such directories with a warning naming the path and reason.
- Nothing is pickled. Tensors (model, optimizer moments, RNG byte states) go to safetensors; the
  rest (optimizer hyper-parameters, scheduler, Python/NumPy RNG, data position, history) to JSON.
  Python floats round-trip through JSON exactly, so a resumed run is bitwise identical on CPU.
- A fingerprint (the model's parameter names/dtypes/shapes, the arm's recipe, the run's seed and
  data digest) is stored and checked on load, so resuming a different model or recipe into the
  same folder fails loudly and names what differs instead of silently mixing two runs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from monolm.core.artifacts import TMP_PREFIX, CorruptArtifact, atomic_dir, sha256_file
from monolm.core.runtime import model_device
from monolm.training.state_tensors import (
    OPTIMIZER_JSON,
    CheckpointMismatch,
    capture_rng,
    optimizer_from_safe,
    optimizer_to_safe,
    restore_rng,
)

log = logging.getLogger("monolm.checkpoint")

FORMAT_VERSION = 1
CHECKPOINT_JSON = "checkpoint.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
RNG_TENSORS = "rng.safetensors"
STATE_JSON = "state.json"
INVALID_DIR = ".invalid"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


# --------------------------------------------------------------------------- naming
def checkpoint_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """All `step-XXXXXXXX` directories under `root`, oldest first (valid or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


# --------------------------------------------------------------------------- atomic directories
def move_aside(path: Path, reason: str) -> Path:
    """Move an untrusted directory to `<parent>/.invalid/` (kept as evidence, never overwritten)."""
    dest_root = path.parent / INVALID_DIR
    dest_root.mkdir(exist_ok=True)
    dest = dest_root / f"{path.name}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    os.replace(path, dest)
    log.warning("moved %s aside to %s: %s", path, dest, reason)
    return dest


# --------------------------------------------------------------------------- fingerprints
def model_signature(model: nn.Module) -> dict[str, str]:
    """`name -> "dtype[shape]"` for every entry of the state_dict (parametrization originals
    included), which is what a checkpoint's weights must fit."""
    return {name: f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}" for name, t in model.state_dict().items()}


def digest_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def make_fingerprint(model: nn.Module, *, config: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: model signature, recipe, run identity."""
    return {"model": model_signature(model), "config": dict(config), "run": dict(run)}


def check_fingerprint(recorded: dict[str, Any], current: dict[str, Any], where: str | Path) -> None:
    """Raise `CheckpointMismatch` naming every difference between two fingerprints."""
    problems: list[str] = []
    rec_model, cur_model = recorded.get("model", {}), current.get("model", {})
    if rec_model != cur_model:
        missing = [k for k in rec_model if k not in cur_model]
        extra = [k for k in cur_model if k not in rec_model]
        changed = [
            f"{k}: checkpoint {rec_model[k]} vs model {cur_model[k]}"
            for k in rec_model
            if k in cur_model and rec_model[k] != cur_model[k]
        ]
        if missing:
            problems.append(f"model lacks {len(missing)} checkpoint tensor(s), e.g. {missing[:3]}")
        if extra:
            problems.append(f"model has {len(extra)} tensor(s) the checkpoint lacks, e.g. {extra[:3]}")
        if changed:
            problems.append(f"{len(changed)} tensor(s) differ in dtype/shape, e.g. {changed[:3]}")
    for section in ("config", "run"):
        rec, cur = recorded.get(section, {}), current.get(section, {})
        for key in sorted(set(rec) | set(cur)):
            if rec.get(key, "<absent>") != cur.get(key, "<absent>"):
                problems.append(
                    f"{section}.{key}: checkpoint {rec.get(key, '<absent>')!r} vs now {cur.get(key, '<absent>')!r}"
                )
    if problems:
        raise CheckpointMismatch(
            f"checkpoint {where} was written by a different model/recipe/run and cannot be resumed:\n  "
            + "\n  ".join(problems)
            + "\n(use a fresh output folder, or restore the original settings)"
        )


# --------------------------------------------------------------------------- save / verify / load
@dataclass
class LoadedCheckpoint:
    path: Path
    step: int
    state: dict[str, Any]  # the training loop's own JSON state (data position, history, ...)
    data_generator_state: torch.Tensor | None


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    param_names: Sequence[str],
    scheduler: Any | None,
    state: dict[str, Any],
    fingerprint: dict[str, Any],
    data_generator_state: torch.Tensor | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write `root/step-<8 digits>/` atomically (checkpoint.json last), then prune old ones.

    An existing directory for the same step (left by an earlier attempt whose later checkpoints
    were lost) is moved to `.invalid/`, not overwritten.
    """
    root = Path(root)
    target = root / checkpoint_dir_name(step)
    superseded = functools.partial(move_aside, reason="superseded by a newly written directory of the same name")
    with atomic_dir(target, existing=superseded) as tmp:
        save_model(model, str(tmp / MODEL_FILE), metadata={"format": "monolm-checkpoint", "step": str(step)})
        opt_tensors, opt_meta = optimizer_to_safe(optimizer, param_names, scheduler)
        save_file(opt_tensors, str(tmp / OPTIMIZER_TENSORS))
        (tmp / OPTIMIZER_JSON).write_text(json.dumps(opt_meta, indent=1))
        rng_tensors, rng_meta = capture_rng()
        if data_generator_state is not None:
            rng_tensors["data_generator"] = data_generator_state
        save_file({k: v.contiguous() for k, v in rng_tensors.items()}, str(tmp / RNG_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps({"step": step, "rng": rng_meta, "train": state}, indent=1))
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {
            "format": FORMAT_VERSION,
            "step": step,
            "created_at": time.time(),
            "files": files,
            "fingerprint": fingerprint,
            "fingerprint_digests": {k: digest_json(v) for k, v in fingerprint.items()},
        }
        (tmp / CHECKPOINT_JSON).write_text(json.dumps(manifest, indent=1))
    if keep_last is not None:
        prune_checkpoints(root, keep_last, protect=target)
    return target


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Return the checkpoint's `checkpoint.json` after checking every listed file's sha256.

    Raises `CorruptArtifact` (with a reason) for incomplete, truncated or altered checkpoints,
    and for tensor files that are not safetensors even though the digests match (a planted
    pickle with a forged checkpoint.json): only headers are read, before anything is loaded,
    so such a checkpoint is skipped like any other invalid one instead of failing the resume.
    """
    path = Path(path)
    manifest_path = path / CHECKPOINT_JSON
    if not manifest_path.is_file():
        raise CorruptArtifact(path, f"incomplete: no {CHECKPOINT_JSON} (the writer did not finish)")
    try:
        manifest = json.loads(manifest_path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptArtifact(manifest_path, f"unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise CorruptArtifact(
            manifest_path,
            f"unknown checkpoint format {manifest.get('format')!r}"
            if isinstance(manifest, dict)
            else "not a JSON object",
        )
    match = _STEP_DIR.match(path.name)
    if match and int(match.group(1)) != manifest.get("step"):
        raise CorruptArtifact(manifest_path, f"records step {manifest.get('step')} but the folder is {path.name}")
    required = {MODEL_FILE, OPTIMIZER_TENSORS, OPTIMIZER_JSON, RNG_TENSORS, STATE_JSON}
    files = manifest.get("files", {})
    if not required <= set(files):
        raise CorruptArtifact(manifest_path, f"does not list {sorted(required - set(files))}")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CorruptArtifact(file, "listed in checkpoint.json but missing")
        if sha256_file(file) != expected:
            raise CorruptArtifact(file, "sha256 differs from checkpoint.json (truncated or altered)")
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), framework="pt"):
                    pass
            except Exception as exc:  # safetensors raises its own SafetensorError
                raise CorruptArtifact(file, f"not a safetensors file ({exc})") from None
    return manifest


def latest_valid_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint under `root` whose files all match their digests, or None.

    Invalid ones are skipped with a warning naming the path and the reason.
    """
    for _, path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
        except (CorruptArtifact, OSError) as exc:
            reason = exc.reason if isinstance(exc, CorruptArtifact) else str(exc)
            where = exc.path if isinstance(exc, CorruptArtifact) else path
            log.warning("skipping checkpoint %s: %s (%s)", path, reason, where)
            continue
        return path
    return None


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    param_names: Sequence[str],
    scheduler: Any | None,
    fingerprint: dict[str, Any],
    restore_rng_states: bool = True,
) -> LoadedCheckpoint:
    """Verify, check the fingerprint, then load weights, optimizer, scheduler and RNG in place."""
    path = Path(path)
    manifest = verify_checkpoint(path)
    check_fingerprint(manifest["fingerprint"], fingerprint, path)
    device = model_device(model)
    missing, unexpected = load_model(model, str(path / MODEL_FILE), strict=True, device=str(device))
    if missing or unexpected:  # strict=True raises first; kept for clarity
        raise CheckpointMismatch(f"{path}: missing {missing}, unexpected {unexpected}")
    opt_tensors = load_file(str(path / OPTIMIZER_TENSORS))
    opt_meta = json.loads((path / OPTIMIZER_JSON).read_text())
    optimizer_from_safe(optimizer, param_names, opt_tensors, opt_meta, scheduler)
    rng_tensors = load_file(str(path / RNG_TENSORS))
    state = json.loads((path / STATE_JSON).read_text())
    if restore_rng_states:
        restore_rng(rng_tensors, state["rng"])
    return LoadedCheckpoint(
        path=path,
        step=int(manifest["step"]),
        state=state["train"],
        data_generator_state=rng_tensors.get("data_generator"),
    )


def prune_checkpoints(root: str | Path, keep_last: int, *, protect: Path | None = None) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints (never `protect`, the one just written
    and verified) and temp directories of killed writers. Returns what was removed."""
    if keep_last < 1:
        raise ValueError("keep_last must be >= 1 (the newest valid checkpoint is never deleted)")
    root = Path(root)
    removed = []
    entries = list_checkpoints(root)
    for _, path in entries[: max(0, len(entries) - keep_last)]:
        if protect is not None and path.resolve() == Path(protect).resolve():
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    for tmp in root.glob(f"{TMP_PREFIX}step-*"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed
