"""The command line as a user meets it: clear refusals before any compute, offline checks that
fail fast instead of hanging."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

MONOLM = [sys.executable, "-m", "flows.cli"]


def monolm(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*MONOLM, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def test_bad_config_refused_before_anything_is_written(tmp_path):
    out = monolm(
        "run",
        "--no-prefect",
        "--preset",
        "tiny",
        "--set",
        "data.seq_len=999",
        "--set",
        f"paths.runs_root={tmp_path / 'runs'}",
        cwd=tmp_path,
    )
    assert out.returncode == 2
    assert "data.seq_len=999 exceeds the model's maximum sequence length 256" in out.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / ".state").exists()

    out = monolm("run", "--preset", "tiny", "--variant", "mlp_everything", cwd=tmp_path)
    assert out.returncode == 2 and "constraint.variant" in out.stderr and "'mlp_both'" in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_bad_config_is_refused_without_loading_torch(tmp_path):
    """A typo in a setting is answered at once: validation never waits for torch to import."""
    probe = (
        "import sys; from flows.cli import main; code = main(['run', '--set', 'training.common.lr=0']); "
        "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded'); sys.exit(code)"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "training.common.lr" in out.stderr
    assert out.stdout.strip() == "torch not loaded"


def test_config_show_prints_the_resolved_config(tmp_path):
    out = monolm("config", "show", "--preset", "full", "--override", "reference", cwd=tmp_path)
    assert out.returncode == 0 and "recipe: reference" in out.stdout and "EleutherAI/pythia-1.4b" in out.stdout


def test_verify_offline_fails_fast_and_clearly(tmp_path):
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}  # nothing listens there
    start = time.time()
    out = monolm("verify", "--preset", "full", "--timeout", "20", cwd=tmp_path, env=env, timeout=200)
    elapsed = time.time() - start
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAIL  hub reachable" in out.stdout and "FAIL  model config loadable" in out.stdout
    assert "PASS  disk space" in out.stdout and "failed" in out.stdout.splitlines()[-1]
    assert elapsed < 150


def test_verify_tiny_passes_offline(tmp_path):
    out = monolm("verify", "--preset", "tiny", cwd=tmp_path)
    assert out.returncode == 0, out.stdout
    assert "FAIL" not in out.stdout


def test_results_filters_by_arm_and_still_takes_model_for_one_release(tmp_path):
    from monolm.store import ResultsStore

    url = f"sqlite:///{tmp_path / 'results.sqlite'}"
    with ResultsStore(url) as store:
        store.record_run(
            {"run_id": "r1", "run_name": "cli-run", "preset": "tiny"},
            [
                {"seed": 42, "arm": arm, "stage": "evaluate", "metric": "token_perplexity", "value": value}
                for arm, value in (("baseline", 21.5), ("monotonic", 23.25))
            ],
        )
    by_arm = monolm("results", "--store", url, "--arm", "monotonic", cwd=tmp_path)
    assert by_arm.returncode == 0, by_arm.stderr
    assert "23.25" in by_arm.stdout and "21.5" not in by_arm.stdout and " arm " in by_arm.stdout
    by_model = monolm("results", "--store", url, "--model", "monotonic", cwd=tmp_path)  # the deprecated alias
    assert by_model.returncode == 0 and by_model.stdout == by_arm.stdout
    help_text = monolm("results", "--help", cwd=tmp_path).stdout
    assert "--arm" in help_text and "--model" not in help_text
