"""`runner.stage_timeout_minutes` stops the stage itself, on a machine whose cores are all busy:
the stage raises `StageTimeout` between units of work and never writes its manifest, with or
without Prefect (whose own timeout may never land in a busy thread)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from helpers import micro_config, micro_sets, stage_dir

from monolm.core.deadline import StageTimeout, check_deadline, stage_deadline

pytestmark = pytest.mark.security

LONG_TRAINING = (
    "training.common.max_steps=400",
    "training.common.epochs=50",
    "training.common.lr=0.0007",  # its own stage 2 results: never a cache hit of another test
    "runner.stage_timeout_minutes={train_baseline: 0.005}",  # 0.3 s
)


@pytest.fixture
def busy_cores():
    """Every core kept busy by other processes for the test's duration (a loaded CI machine)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(max(2, os.cpu_count() or 2))]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(30)


def test_the_deadline_raises_once_passed_and_only_inside_its_stage():
    check_deadline()  # no stage, no deadline
    with stage_deadline("evaluate", None):
        check_deadline()
    with stage_deadline("evaluate", 1e-6) as deadline:  # 60 microseconds
        while time.monotonic() <= deadline.at:  # the condition itself, not a guess of a sleep
            pass
        with pytest.raises(StageTimeout, match=r"stage evaluate exceeded timeout of 6e-05 second\(s\)") as info:
            check_deadline("between evaluation batches")
    assert isinstance(info.value, TimeoutError) and "between evaluation batches" in str(info.value)
    check_deadline()  # the deadline ended with its stage


@pytest.mark.slow
def test_a_timed_out_stage_stops_and_writes_no_manifest_under_load(tmp_path, busy_cores):
    from monolm.study.sequential import run_seed

    cfg = micro_config(tmp_path, *LONG_TRAINING)
    with pytest.raises(StageTimeout, match=r"stage train_baseline exceeded timeout of 0.3 second"):
        run_seed(cfg, 42, stages=2, progress=False)
    folder = stage_dir(cfg, 42, "train_baseline")
    assert (stage_dir(cfg, 42, "constrain") / "manifest.json").is_file()  # the stages before finished
    assert not (folder / "manifest.json").exists()
    if (folder / "history.json").exists():
        assert json.loads((folder / "history.json").read_text())["summary"]["steps_done"] < 400


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_backend")
def test_a_timed_out_task_fails_the_flow_and_writes_no_manifest_under_load(tmp_path, busy_cores):
    from flows.experiment import experiment

    with pytest.raises(Exception, match="train_baseline") as info:
        experiment(seeds=[42], preset="tiny", overrides=micro_sets(tmp_path, *LONG_TRAINING))
    assert "timeout" in str(info.value).lower() or "timed" in str(info.value).lower(), info.value
    folder = stage_dir(micro_config(tmp_path, *LONG_TRAINING), 42, "train_baseline")
    assert not (folder / "manifest.json").exists()
