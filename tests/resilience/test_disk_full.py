"""Disk full. A write that fails for lack of space must leave every earlier file intact (above all
the previous checkpoint), fail the stage with a message that names it, and a re-run after space
was freed must continue where it stopped and end with the same result as a run that never failed.

Two ways to fill the disk: a real, small tmpfs (we are root in CI; skipped where mounting is not
allowed), and OSError(ENOSPC) injected at one chosen write call (always runs).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from monolm.study.registry import SEED_STAGE_NAMES
from monolm.training.checkpoint import list_checkpoints, verify_checkpoint
from resilience.helpers import micro_argv, run_cli, seed_dir, stage_outputs
from resilience.trainruns import assert_identical, finish, start

pytestmark = pytest.mark.resilience

STAGES = SEED_STAGE_NAMES  # every per-seed stage, in the order they run


@pytest.fixture
def small_tmpfs(tmp_path):
    """mount(size) -> a tmpfs of that size under tmp_path; resize(size) grows it; unmounted after."""
    mounts: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / f"tmpfs{len(mounts)}"
        where.mkdir()
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); the ENOSPC-injection tests still run")
        mounts.append(where)
        return where

    def resize(where: Path, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)

    yield mount, resize
    for where in reversed(mounts):
        subprocess.run(["umount", str(where)], check=False)


def test_full_filesystem_mid_training_keeps_the_previous_checkpoint(small_tmpfs, reference):
    """train() on a 2.5 MB tmpfs: checkpoint 3 (1.4 MB) and the best model (0.5 MB) fit,
    checkpoint 6 does not. The process fails; step 3 is intact and nothing half-written sits under
    a real name. After the disk grows, the re-run resumes from step 3 and is bitwise identical to
    an uninterrupted run."""
    mount, resize = small_tmpfs
    disk = mount("2500k")
    out = disk / "run"
    failed = start(out, tag="full")
    assert failed.wait() != 0
    assert "No space left on device" in failed.output(), failed.output()[-3000:]
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [3]
    verify_checkpoint(out / "checkpoints" / "step-00000003")  # every file matches its sha256
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the failed writer cleaned up after itself
    assert json.loads((out / "best" / "best.json").read_text())["step"] == 4

    resize(disk, "20m")
    result, _ = finish(out, tag="after")
    assert result["resumed_from"] == str(out / "checkpoints" / "step-00000003")
    assert_identical(out, reference(False))


def _manifests(root: Path) -> dict[str, bytes]:
    return {
        s: (seed_dir(root) / s / "manifest.json").read_bytes()
        for s in STAGES
        if (seed_dir(root) / s / "manifest.json").is_file()
    }


def _outputs(root: Path) -> dict[str, dict]:
    return stage_outputs(seed_dir(root), STAGES)


FULL = re.compile(
    r"monolm: stage (\w+) \(seed 42\) failed: no space left on device while writing under "
    r"(\S+) \([\d.]+ MiB free\)\. Everything written before is intact"
)


def test_full_disk_fails_the_stage_clearly_and_a_rerun_continues(small_tmpfs, micro_pipeline):
    """The micro pipeline on a tmpfs that holds stages 0-1 and then only 3 MB more (stage 0
    refuses to start below 1 GiB free, so the disk fills up *during* the run, as it does in real
    life): the training stage runs out of space. `monolm` says which stage, where, how much is
    free, and that earlier work is kept (no traceback). Finished stages keep their manifests;
    after the disk grows the re-run reuses them, resumes the failed stage and produces exactly
    the outputs of a run that never hit a full disk."""
    mount, resize = small_tmpfs
    disk = mount("2g")
    code, out = run_cli(micro_argv(disk, stages=1), cwd=disk)
    assert code == 0, out[-3000:]
    used_kib = int(
        subprocess.run(
            ["df", "-k", "--output=used", str(disk)], capture_output=True, text=True, check=True
        ).stdout.split()[-1]
    )
    resize(disk, f"{used_kib + 3072}k")

    code, out = run_cli(micro_argv(disk), cwd=disk)
    assert code == 1, out[-3000:]
    match = FULL.search(out)
    assert match, out[-3000:]
    assert match.group(1) == "train_baseline" and match.group(2) == str(seed_dir(disk) / "train_baseline")
    assert "Traceback" not in out
    before = _manifests(disk)
    assert set(before) == {"setup", "constrain"}
    ckpts = seed_dir(disk) / "train_baseline" / "checkpoints"
    for _, path in list_checkpoints(ckpts):
        verify_checkpoint(path)  # whatever checkpoint exists is whole
    assert not list(ckpts.glob(".tmp-*"))

    resize(disk, "2g")
    code, out = run_cli(micro_argv(disk), cwd=disk)
    assert code == 0, out[-3000:]
    after = _manifests(disk)
    assert {s: after[s] for s in before} == before  # finished stages were reused, not redone
    assert _outputs(disk) == _outputs(micro_pipeline)  # the same outputs, stage by stage


def test_enospc_at_a_checkpoint_write_and_at_a_manifest_write(tmp_path, micro_pipeline):
    """ENOSPC injected (1) into the step-4 checkpoint write of the baseline arm, (2) into the
    evaluate stage's manifest write on the re-run. Each run fails naming its stage; the previous
    checkpoint (step 2) and every finished stage stay intact; the third run finishes with outputs
    identical to an undisturbed run's."""
    argv = micro_argv(tmp_path)
    code, out = run_cli(
        argv,
        cwd=tmp_path,
        faults=[
            {
                "target": "monolm.training.checkpoint:save_file",
                "match": r"/train_baseline/checkpoints/\.tmp-step-00000004-",
            }
        ],
    )
    assert code == 1 and FULL.search(out) and FULL.search(out).group(1) == "train_baseline", out[-3000:]
    ckpts = seed_dir(tmp_path) / "train_baseline" / "checkpoints"
    assert [s for s, _ in list_checkpoints(ckpts)] == [2]
    verify_checkpoint(ckpts / "step-00000002")
    assert not list(ckpts.glob(".tmp-*"))
    first = _manifests(tmp_path)
    assert set(first) == {"setup", "constrain"}

    code, out = run_cli(
        argv, cwd=tmp_path, faults=[{"target": "pathlib:Path.write_bytes", "match": r"/evaluate/\.tmp-manifest\.json"}]
    )
    assert code == 1 and FULL.search(out) and FULL.search(out).group(1) == "evaluate", out[-3000:]
    assert "resuming" in out and "step-00000002" in out  # the baseline arm continued from its checkpoint
    second = _manifests(tmp_path)
    assert {s: second[s] for s in first} == first
    # The baseline's share of stage 4 (its own folder, evaluate_baseline) finished before the cell's.
    assert set(second) == {"setup", "constrain", "train_baseline", "train_monotonic", "evaluate_baseline"}
    assert not (seed_dir(tmp_path) / "evaluate" / "manifest.json").exists()

    code, out = run_cli(argv, cwd=tmp_path)
    assert code == 0, out[-3000:]
    third = _manifests(tmp_path)
    assert {s: third[s] for s in second} == second
    assert _outputs(tmp_path) == _outputs(micro_pipeline)
