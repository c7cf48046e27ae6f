"""bench/gpu.py on the CPU at a tiny shape: every section runs through the project's own code,
the choices of batched and per-candidate attack scoring agree, and the figures come out as
`key=value` lines and as JSON (the CUDA run at Pythia-1.4B is the same script)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.bench

TINY = [
    "--device", "cpu", "--arch", "small", "--hidden", "64", "--layers", "2", "--vocab", "1024",
    "--seq-len", "32", "--micro-batch", "2", "--steps", "2", "--warmup", "1", "--eval-docs", "4",
    "--uat-texts", "3", "--uat-top-k", "4", "--hotflip-top-b", "4", "--text-tokens", "16", "--repeats", "1",
]  # fmt: skip


def test_gpu_bench_runs_on_cpu_and_reports_every_figure(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MONOLM_DEVICE": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), *TINY, "--out", str(out), "--tmp", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line and " " not in line)
    for key in (
        "train_tokens_per_s_baseline",
        "train_mfu_baseline",
        "train_mfu_monotonic",
        "peak_mem_gb_monotonic",
        "mem_estimate_gb_monotonic",
        "train_step_ratio",
        "eval_tokens_per_s",
        "uat_speedup",
        "hotflip_speedup",
        "gcg_speedup",
        "checkpoint_save_s",
        "checkpoint_gb",
    ):
        assert key in lines, f"{key} missing from the key=value lines:\n{proc.stdout}"
    record = json.loads(out.read_text())
    assert record["model"].endswith("(RANDOM WEIGHTS)")
    assert record["key_values"]["train_step_ratio"] == float(lines["train_step_ratio"])
    train = record["train"]
    for arm in ("baseline", "monotonic"):
        assert train[arm]["tokens_per_s"] > 0 and train[arm]["mfu"] > 0
        assert train[arm]["micro_batch"] == 2 and not train[arm]["bf16"]  # CPU: fp32, as the stages
    assert train["monotonic"]["estimate_gb"] > train["baseline"]["estimate_gb"]  # V kept, W materialised
    assert record["eval"]["tokens"] > 0
    for what in ("uat", "hotflip", "gcg"):
        assert record["attacks"][what]["candidates"] > 1 and record["attacks"][what]["speedup"] > 0
    assert record["checkpoint"]["bytes"] >= 12 * record["parameters"]  # fp32 weights + two AdamW moments
    assert not list(tmp_path.glob("tmp*")), "the checkpoint's temporary folder was left behind"
