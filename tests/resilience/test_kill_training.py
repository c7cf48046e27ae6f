"""Exact resume after a real SIGKILL: a separate process runs `monolm.training.train()` on a tiny
GPT-NeoX (dropout on), is killed at a chosen step or inside a checkpoint / best-model / history
write, and is re-run. The re-run must end with the very same weights, optimizer moments, scheduler,
RNG states, data position, best model and history as an uninterrupted run (bitwise, CPU), must
never open a temp file a killed writer left behind, and must name every damaged checkpoint it
skips.

Recipe (worker.tiny_arm): 12 optimizer steps, a checkpoint every 3 (kept: last 3), an evaluation
and best-model update every 4, a log entry (and history write) every step.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from monolm.training.checkpoint import list_checkpoints
from resilience.helpers import flip_bit, kill_at_marker, pause, read_audit, temp_reads, truncate
from resilience.trainruns import assert_identical, finish, resumes, start

pytestmark = pytest.mark.resilience

# --------------------------------------------------------------------------- kill points
KILL_POINTS = {
    # name: (pause spec builder, checkpoint steps left at the kill, step the re-run resumes from)
    "before the first checkpoint (step 2)": (lambda m: {"pause_step": 2}, [], None),
    "between checkpoints (step 7)": (lambda m: {"pause_step": 7}, [3, 6], 6),
    "inside a checkpoint write (model written, optimizer not)": (
        lambda m: {"pauses": [pause("monolm.training.checkpoint:save_file", m, match=r"/\.tmp-step-00000009-")]},
        [3, 6],
        6,
    ),
    "complete temp checkpoint, not yet renamed": (
        lambda m: {"pauses": [pause("os:replace", m, match=r"/\.tmp-step-00000006-[^/ ]+ ")]},
        [3],
        3,
    ),
    "between the two renames of a best-model swap": (
        lambda m: {"pauses": [pause("os:replace", m, match=r"/\.tmp-best-[^/ ]+ \S+/best$", nth=2)]},
        [3, 6],
        6,
    ),
    "inside a history.json write": (
        lambda m: {"pauses": [pause("os:replace", m, match=r"/\.tmp-history\.json\.", nth=10)]},
        [3, 6, 9],
        9,
    ),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_rerun_equals_uninterrupted_run(tmp_path, reference, point):
    build, left, resume_step = KILL_POINTS[point]
    out, marker = tmp_path / "run", tmp_path / "paused"
    info = kill_at_marker(start(out, marker=marker, **build(marker), tag="killed"), marker)

    # What the kill left: only whole checkpoints under real names, and the torn write where it was.
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == left
    leftovers = sorted(p.name for p in (out / "checkpoints").glob(".tmp-*")) if (out / "checkpoints").exists() else []
    if "checkpoint write" in point:
        assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-step-00000009-"), leftovers
        torn = out / "checkpoints" / leftovers[0]
        assert (torn / "model.safetensors").is_file() and not (torn / "checkpoint.json").exists()
    if "not yet renamed" in point:
        assert len(leftovers) == 1 and (out / "checkpoints" / leftovers[0] / "checkpoint.json").is_file()
    if "best-model swap" in point:
        assert not (out / "best").exists() and list(out.glob(".old-best-*")), sorted(p.name for p in out.iterdir())
        assert any(".tmp-best-" in a for a in info["args"])
    if "history" in point:
        assert list(out.glob(".tmp-history.json.*"))

    result, text = finish(out, audit=True, tag="resumed")
    expected = None if resume_step is None else str(out / "checkpoints" / f"step-{resume_step:08d}")
    assert result["resumed_from"] == expected, text
    assert temp_reads(read_audit(out.parent / "run-resumed.audit")) == []  # no torn file was ever read
    assert not list((out / "checkpoints").glob(".tmp-*"))  # killed writers' leftovers are removed
    assert_identical(out, reference(False))


def test_killed_twice_constrained_arm(tmp_path, reference):
    """Two preemptions in a row, on the constrained arm (parametrized softplus weights)."""
    out = tmp_path / "run"
    for step, marker in ((5, tmp_path / "first"), (10, tmp_path / "second")):
        kill_at_marker(start(out, constrained=True, pause_step=step, marker=marker, tag=f"kill{step}"), marker)
    finish(out, constrained=True)
    assert resumes(out) == [3, 9]
    assert_identical(out, reference(True))


# --------------------------------------------------------------------------- damaged checkpoints
def _bitflip_model(ckpt: Path) -> Path:
    flip_bit(ckpt / "model.safetensors")
    return ckpt / "model.safetensors"


def _truncate_optimizer(ckpt: Path) -> Path:
    truncate(ckpt / "optimizer.safetensors", 0.3)
    return ckpt / "optimizer.safetensors"


def _truncate_manifest(ckpt: Path) -> Path:
    truncate(ckpt / "checkpoint.json", 0.5)
    return ckpt / "checkpoint.json"


def _bitflip_state(ckpt: Path) -> Path:
    path = ckpt / "state.json"
    text = path.read_text()
    path.write_text(text.replace('"step": 9', '"step": 8', 1))  # still valid JSON, different content
    return path


def _delete_rng(ckpt: Path) -> Path:
    (ckpt / "rng.safetensors").unlink()
    return ckpt / "rng.safetensors"


DAMAGE = {
    "bit-flipped weights": _bitflip_model,
    "truncated optimizer state": _truncate_optimizer,
    "truncated checkpoint.json": _truncate_manifest,
    "altered state.json": _bitflip_state,
    "missing RNG file": _delete_rng,
}


def test_damaged_newest_checkpoint_is_named_skipped_and_resume_stays_exact(tmp_path, reference):
    """Killed at step 11 (checkpoints 3, 6, 9), then the newest checkpoint is damaged five ways;
    each re-run warns with the damaged path, resumes from step 6 and still ends bitwise equal."""
    killed, marker = tmp_path / "killed", tmp_path / "paused"
    kill_at_marker(start(killed, pause_step=11, marker=marker, tag="kill"), marker)
    assert [s for s, _ in list_checkpoints(killed / "checkpoints")] == [3, 6, 9]
    for name, damage in DAMAGE.items():
        out = tmp_path / name.replace(" ", "-")
        shutil.copytree(killed, out)
        damaged = damage(out / "checkpoints" / "step-00000009")
        result, text = finish(out, tag="resume")
        assert result["resumed_from"] == str(out / "checkpoints" / "step-00000006"), (name, text)
        warning = [line for line in text.splitlines() if "skipping checkpoint" in line]
        assert warning and str(damaged) in warning[0], (name, text)
        assert list((out / "checkpoints" / ".invalid").iterdir()), name  # kept as evidence, never reused
        assert_identical(out, reference(False))


# --------------------------------------------------------------------------- damaged best model
@pytest.mark.parametrize("damage", ["bit-flipped best/model.safetensors", "deleted best/best.json"])
def test_damaged_best_model_of_a_finished_run_is_recreated_not_reblessed(tmp_path, reference, damage):
    """A finished run whose best model was damaged must not hand the damaged file on (the stage
    would checksum it into a new manifest): it replays from the newest checkpoint before the
    best step, which re-selects and rewrites the identical best model."""
    out = tmp_path / "run"
    shutil.copytree(reference(False), out)
    best_step = json.loads((out / "best" / "best.json").read_text())["step"]
    if damage.startswith("bit"):
        flip_bit(out / "best" / "model.safetensors")
    else:
        (out / "best" / "best.json").unlink()
    result, text = finish(out, tag="again")
    replay_from = max((s for s in (3, 6, 9) if s < best_step), default=None)
    assert result["resumed_from"] == (str(out / "checkpoints" / f"step-{replay_from:08d}") if replay_from else None)
    assert f"the best model (step {best_step}) is missing or damaged" in text, text
    assert any(p.name.startswith("best-") for p in (out / ".invalid").iterdir())  # the damaged copy, as evidence
    assert_identical(out, reference(False))
