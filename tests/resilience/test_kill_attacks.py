"""Attack resume after a real SIGKILL: `monolm run` is killed while stage 5 (UAT, 3 restarts per
arm) or stage 6 (HotFlip, 4 blocks per method per arm) is part-way, once right after a unit
finished and once inside a unit's write. The re-run reuses every finished unit (the files are
not even rewritten), recomputes a unit damaged after the kill (with a warning naming it), never
opens a temp file a killed writer left, and ends with exactly the outputs of a run that was never
interrupted.

Stages 0-4 are shared with the session's micro pipeline (copied; they are reused, not re-run).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from resilience.helpers import (
    kill_at_marker,
    micro_argv,
    pause,
    read_audit,
    run_cli,
    seed_dir,
    spawn_cli,
    stage_outputs,
    temp_reads,
    truncate,
)

pytestmark = pytest.mark.resilience

ATTACKS = ("attacks.uat.restarts=3", "attacks.hotflip.block_size=2")
ATTACK_STAGES = ("uat_baseline", "uat", "hotflip_baseline", "hotflip")
WRITE_UNIT = "monolm.attacks.units:write_unit"


def argv(root: Path) -> list[str]:
    return micro_argv(root, *ATTACKS, stages=6)


def copy_pipeline(micro_pipeline: Path, root: Path) -> Path:
    shutil.copytree(micro_pipeline / "runs", root / "runs")
    return root


@pytest.fixture(scope="module")
def uninterrupted(micro_pipeline, tmp_path_factory) -> Path:
    root = copy_pipeline(micro_pipeline, tmp_path_factory.mktemp("attacks-uninterrupted"))
    code, out = run_cli(argv(root), cwd=root)
    assert code == 0, out[-4000:]
    return root


def kill_run(root: Path, tmp_path: Path, log: str, marker_name: str, target: str, **where):
    """Run the attack stages on `root` and SIGKILL the run where it pauses at `target` (`pause`
    with `where`); returns the killed process, for its output."""
    marker = tmp_path / marker_name
    proc = spawn_cli(argv(root), cwd=root, log=tmp_path / log, pauses=[pause(target, marker, **where)])
    kill_at_marker(proc, marker)
    return proc


def units(stage_dir: Path, arm: str = "baseline") -> dict[str, tuple[int, int]]:
    """unit file -> (inode, mtime_ns): a reused unit keeps both, a rewritten one gets a new inode."""
    folder = stage_dir / arm / "units"
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.glob("*.json"))}


def test_uat_killed_twice_resumes_from_finished_restarts(tmp_path, micro_pipeline, uninterrupted):
    root = copy_pipeline(micro_pipeline, tmp_path)
    uat = seed_dir(root) / "uat_baseline"  # the baseline's share of stage 5, attacked first

    # 1. Killed right after the baseline's second restart was written.
    kill_run(root, tmp_path, "kill1.log", "after-unit", WRITE_UNIT, nth=2, when="after")
    assert list(units(uat)) == ["uat-0000.json", "uat-0001.json"]
    assert not (uat / "manifest.json").exists()
    kept = units(uat)

    # 2. The re-run is killed inside the write of restart 2 (temp file written, not renamed).
    proc = kill_run(
        root, tmp_path, "kill2.log", "in-write", "os:replace", match=r"/baseline/units/\.tmp-uat-0002\.json\."
    )
    assert "uat restart 1/3: reused finished unit" in proc.output()
    assert list((uat / "baseline" / "units").glob(".tmp-uat-0002.json.*"))
    assert units(uat) == kept  # restarts 0 and 1 were reused, not rewritten

    # 3. Damage restart 1 after the kill, then run to the end (audited).
    truncate(uat / "baseline" / "units" / "uat-0001.json", 0.6)
    audit = tmp_path / "final.audit"
    code, out = run_cli(argv(root), cwd=root, audit={"log": str(audit), "root": str(root)})
    assert code == 0, out[-4000:]
    assert "uat restart 1/3: reused finished unit" in out
    assert f"unit {uat / 'baseline' / 'units' / 'uat-0001.json'} is corrupt or truncated; recomputing it" in out
    assert units(uat)["uat-0000.json"] == kept["uat-0000.json"]
    assert temp_reads(read_audit(audit)) == []
    assert not list(uat.rglob(".tmp-*"))
    assert stage_outputs(seed_dir(root), ATTACK_STAGES) == stage_outputs(seed_dir(uninterrupted), ATTACK_STAGES)


def test_hotflip_killed_mid_way_resumes_from_finished_blocks(tmp_path, micro_pipeline, uninterrupted):
    root = copy_pipeline(micro_pipeline, tmp_path)
    code, out = run_cli(micro_argv(root, *ATTACKS, stages=5), cwd=root)  # UAT done, HotFlip not started
    assert code == 0, out[-4000:]
    hotflip = seed_dir(root) / "hotflip_baseline"  # the baseline's share of stage 6, attacked first

    # Killed after 3 of the baseline's 8 units (4 gradient blocks, then 4 control blocks).
    kill_run(root, tmp_path, "kill.log", "after-unit", WRITE_UNIT, nth=3, when="after")
    kept = units(hotflip)
    assert list(kept) == ["hotflip-0000.json", "hotflip-0001.json", "hotflip-0002.json"]
    assert not (hotflip / "manifest.json").exists()

    audit = tmp_path / "final.audit"
    code, out = run_cli(argv(root), cwd=root, audit={"log": str(audit), "root": str(root)})
    assert code == 0, out[-4000:]
    assert {k: v for k, v in units(hotflip).items() if k in kept} == kept  # reused, not recomputed
    assert temp_reads(read_audit(audit)) == []
    assert stage_outputs(seed_dir(root), ATTACK_STAGES) == stage_outputs(seed_dir(uninterrupted), ATTACK_STAGES)
