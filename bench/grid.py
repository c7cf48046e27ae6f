"""Wall time of the tiny preset's three-variant x two-seed grid against today's one-variant
two-seed run, both on the `dask-local` profile (stages in parallel on a LocalCluster).

Every run starts from empty runs and results folders (nothing is a cache hit) and is a fresh
`monolm run` process with its own temporary Prefect server; rounds are interleaved (which side
goes first alternates). Prints each run's wall time, the medians and `grid_ratio=<grid / one
variant>`; the goal is <= 2.5 (the grid shares stage 0, the baseline's training, evaluation and
attacks across its three variants).

    .venv/bin/python bench/grid.py --rounds 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIDES = {
    "one-variant": ["--variants", "mlp_in"],
    "grid": ["--variants", "mlp_in", "mlp_both", "mlp_in_attn_out"],
}


def run_once(side: str, seeds: list[str]) -> float:
    """One `monolm run` of `side` from scratch; its wall time in seconds."""
    root = Path(tempfile.mkdtemp(prefix=f"monolm-bench-grid-{side}-"))
    env = {
        **os.environ,
        "PREFECT_HOME": str(root / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("PREFECT_API_URL", None)
    args = [sys.executable, "-m", "flows.cli", "run", "-q", "--preset", "tiny", "--seeds", *seeds]
    args += ["--profile", "dask-local", *SIDES[side], "--run-name", side]
    args += ["--set", f"paths.runs_root={root / 'runs'}", "--set", f"paths.results_root={root / 'results'}"]
    started = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    shutil.rmtree(root, ignore_errors=True)
    if proc.returncode:
        raise SystemExit(f"{side} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seeds", nargs="+", default=["42", "1337"])
    args = ap.parse_args()
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    for r in range(args.rounds):
        order = list(SIDES) if r % 2 == 0 else list(reversed(SIDES))
        for side in order:
            times[side].append(run_once(side, args.seeds))
            print(f"round {r + 1}: {side}: {times[side][-1]:.1f} s", flush=True)
    medians = {side: statistics.median(t) for side, t in times.items()}
    for side, t in times.items():
        print(f"{side}: median {medians[side]:.1f} s over {len(t)} run(s) {[round(x, 1) for x in t]}")
    print(f"grid_ratio={medians['grid'] / medians['one-variant']:.2f}")


if __name__ == "__main__":
    main()
