"""Tiny training runs in killable processes, and the comparison of two finished runs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from monolm.training.checkpoint import list_checkpoints
from resilience.helpers import fork_worker, strip_wall_clock


def start(
    out: Path,
    *,
    constrained: bool = False,
    pauses: list | None = None,
    pause_step: int | None = None,
    marker: Path | None = None,
    audit: bool = False,
    tag: str = "run",
):
    spec = {"out": str(out), "constrained": constrained, "pauses": pauses or []}
    if pause_step is not None:
        spec.update(pause_step=pause_step, marker=str(marker))
    if audit:
        spec["audit"] = {"log": str(out.parent / f"{out.name}-{tag}.audit"), "root": str(out)}
    return fork_worker("train", spec, out.parent / f"{out.name}-{tag}.log")


def finish(out: Path, **kw) -> tuple[dict, str]:
    """Run to completion; returns (the worker's result line, its whole output)."""
    text = start(out, **kw).finish()
    result = json.loads([line for line in text.splitlines() if line.startswith("{")][-1])
    assert result["completed"] and result["steps"] == 12, text
    return result, text


def run_state(out: Path) -> dict:
    """Everything a finished run leaves that must not depend on whether it was interrupted."""
    (step, final), *_ = list_checkpoints(out / "checkpoints")[::-1]
    assert step == 12
    return {
        "tensors": {
            f"{name}:{key}": value
            for name in ("model", "optimizer", "rng")
            for key, value in load_file(str(final / f"{name}.safetensors")).items()
        },
        "optimizer.json": json.loads((final / "optimizer.json").read_text()),  # hyper-params + scheduler
        "state.json": strip_wall_clock(json.loads((final / "state.json").read_text())),  # python/numpy RNG, position
        "best": load_file(str(out / "best" / "model.safetensors")),
        "best.json": strip_wall_clock(json.loads((out / "best" / "best.json").read_text())),
        "history": strip_wall_clock(json.loads((out / "history.json").read_text())),
    }


def assert_identical(out: Path, reference: Path) -> None:
    got, want = run_state(out), run_state(reference)
    for part in ("tensors", "best"):
        assert got[part].keys() == want[part].keys(), part
        differing = [k for k in want[part] if not torch.equal(got[part][k], want[part][k])]
        assert not differing, f"{part}: {differing[:5]} differ from the uninterrupted run"
    for part in ("optimizer.json", "state.json", "best.json", "history"):
        assert got[part] == want[part], f"{part} differs from the uninterrupted run"


def resumes(out: Path) -> list[int]:
    return [r["step"] for r in json.loads((out / "history.json").read_text())["resumes"]]
