"""Wall time of the two-seed `experiment` (tiny preset, the tests' micro overrides) on the `slurm`
profile against a local SLURM (infra/slurm/local-slurm.sh: 2 CPUs, 2 fake a100s, at most two
one-CPU worker jobs) vs. the `local` profile (in-process, one stage at a time).

Rounds are interleaved (which profile goes first alternates) and every run starts from an empty
runs root, so nothing is a cache hit; one temporary Prefect server serves all runs. Prints each
run's wall time, the medians and the ratio slurm/local.

    .venv/bin/python bench/slurm_profile.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("MONOLM_TORCH_THREADS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import micro_sets, slurm_sets  # noqa: E402  (the tests' tiny-pipeline and local-SLURM overrides)

SCRIPT = REPO / "infra/slurm/local-slurm.sh"


def one_run(profile: str, root: Path) -> float:
    from flows.experiment import experiment

    sets = slurm_sets(root) if profile == "slurm" else micro_sets(root, "runner.profile=local")
    t0 = time.perf_counter()
    result = experiment(seeds=[42, 1337], preset="tiny", overrides=sets, run_name=f"bench-{profile}-{root.name}")
    wall = time.perf_counter() - t0
    states = {s for seed, v in result["stage_states"].items() if isinstance(v, dict) for s in v.values()}
    assert states == {"Completed"}, result["stage_states"]
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    state = Path(tempfile.mkdtemp(prefix="monolm-bench-slurm-"))
    state.chmod(0o755)
    work = Path(tempfile.mkdtemp(prefix="monolm-bench-runs-"))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, "MONOLM_STATE_DIR": str(state)}
    try:
        subprocess.run(
            [str(SCRIPT), "start", "--cpus", "2", "--gpus", "2", "--memory", "8192"],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        os.environ["SLURM_CONF"] = str(state / "slurm/etc/slurm.conf")
        from prefect.testing.utilities import prefect_test_harness

        walls: dict[str, list[float]] = {"slurm": [], "local": []}
        with prefect_test_harness(server_startup_timeout=120):
            for r in range(args.rounds):
                order = ("slurm", "local") if r % 2 == 0 else ("local", "slurm")
                for profile in order:
                    wall = one_run(profile, work / f"{profile}-{r}")
                    walls[profile].append(wall)
                    print(f"round {r + 1}: {profile:5s} {wall:6.1f} s", flush=True)
        med = {p: statistics.median(w) for p, w in walls.items()}
        print(
            json.dumps(
                {
                    "runs_s": {p: [round(x, 1) for x in w] for p, w in walls.items()},
                    "median_s": {p: round(m, 1) for p, m in med.items()},
                    "ratio_slurm_over_local": round(med["slurm"] / med["local"], 2),
                },
                indent=1,
            )
        )
    finally:
        subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, text=True)
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
