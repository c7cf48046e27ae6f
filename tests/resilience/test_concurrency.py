"""Concurrency with real processes. Two seeds and two variants at once write only into their own
folders (proved from each process's audited file operations) and produce what they produce
alone. Two runs of the *same* seed at once, as Prefect flows against one server or as plain
`--no-prefect` runs, do not corrupt it: one waits for the other and reuses its stages, so every
stage is computed once and the outputs equal a lone run's."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from monolm.core.artifacts import load_manifest
from monolm.study.registry import SEED_STAGE_NAMES
from resilience.helpers import micro_argv, read_audit, seed_dir, spawn_cli, stage_outputs, written_paths

pytestmark = pytest.mark.resilience

STAGES = SEED_STAGE_NAMES  # every per-seed stage, in the order they run


def start_all(root: Path, runs: dict[str, list[str]], env: dict | None = None, audit: bool = True):
    procs = {}
    for name, argv in runs.items():
        spec = {"log": str(root / f"{name}.audit"), "root": str(root / "runs")} if audit else None
        procs[name] = spawn_cli(argv, cwd=root, log=root / f"{name}.log", audit=spec, env=env)
    outputs = {name: proc.finish(timeout=600) for name, proc in procs.items()}
    return outputs


def test_two_seeds_and_two_variants_at_once_stay_in_their_folders(tmp_path, micro_pipeline):
    runs = {
        "seed42-mlp_in": micro_argv(tmp_path),
        "seed43-mlp_in": micro_argv(tmp_path, "seeds=[43]"),
        "seed42-mlp_both": micro_argv(tmp_path, "constraint.variant=mlp_both"),
    }
    start_all(tmp_path, runs)
    folders = {
        "seed42-mlp_in": seed_dir(tmp_path, 42),
        "seed43-mlp_in": seed_dir(tmp_path, 43),
        "seed42-mlp_both": seed_dir(tmp_path, 42, "mlp_both"),
    }
    for name, folder in folders.items():
        written = written_paths(read_audit(tmp_path / f"{name}.audit"))
        assert written, name
        roots = [str(root) for root in folder.roots]  # the cell's own folder and its model's shared one
        outside = sorted(
            p for p in written if not any(p.startswith(r + os.sep) or p == r or r.startswith(p + os.sep) for r in roots)
        )  # creating the parents is fine
        assert outside == [], f"{name} wrote outside {roots}: {outside[:5]}"
        for stage in STAGES:
            load_manifest(folder / stage)  # every output matches its sha256
        assert not [p for p in folder.iterdir() if ".superseded-" in p.name]

    # Run concurrently, seed 42 produced exactly what it produces alone; stage 0 does not depend
    # on the variant, so both variants' seed-42 setups agree; another seed is another experiment.
    alone = stage_outputs(seed_dir(micro_pipeline), STAGES)
    assert stage_outputs(folders["seed42-mlp_in"], STAGES) == alone
    both = stage_outputs(folders["seed42-mlp_both"], STAGES)
    assert both["setup"] == alone["setup"] and both["constrain"] != alone["constrain"]
    assert stage_outputs(folders["seed43-mlp_in"], ("setup",))["setup"] != alone["setup"]


def _no_duplicate_work(folder: Path) -> None:
    names = [p.name for p in folder.iterdir()]
    assert not [n for n in names if ".superseded-" in n], names  # nobody moved the other's work aside


def test_two_plain_runs_of_one_seed_at_once(tmp_path, micro_pipeline):
    """`monolm run --no-prefect` twice at the same time on seed 42: whichever reaches a stage second
    waits and reuses it. Which run that is may change from stage to stage (both wait for the next
    stage's lock when one finishes a stage), so at least one waited, and no work was done twice."""
    outputs = start_all(tmp_path, {"first": micro_argv(tmp_path), "second": micro_argv(tmp_path)}, audit=False)
    waited = [name for name, out in outputs.items() if "is being run by another process; waiting" in out]
    assert waited, outputs
    _no_duplicate_work(seed_dir(tmp_path))
    assert stage_outputs(seed_dir(tmp_path), STAGES) == stage_outputs(seed_dir(micro_pipeline), STAGES)


EXECUTED = re.compile(r"stages executed \(not cache hits\): (.*)")


@pytest.mark.usefixtures("prefect_backend")
def test_two_flows_for_one_seed_at_once(tmp_path, micro_pipeline):
    """Two `monolm run` (Prefect flow) processes on seed 42 against one Prefect server: stage
    tasks serialize on file locks under the runs root, so each stage executes in one flow and is
    a cache hit in the other, and the seed's outputs equal a lone run's."""
    from prefect.settings import PREFECT_API_URL

    env = {"PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    argv = [a for a in micro_argv(tmp_path) if a not in ("--no-prefect", "--stages", "6")]
    outputs = start_all(
        tmp_path,
        {"first": [*argv, "--run-name", "first"], "second": [*argv, "--run-name", "second"]},
        env=env,
        audit=False,
    )
    executed = {}
    for name, out in outputs.items():
        match = EXECUTED.search(out)
        assert match, out[-4000:]
        executed[name] = {s for s in match.group(1).split(", ") if s and s != "none"}
    per_seed = {name: {s for s in stages if s.endswith("[42]")} for name, stages in executed.items()}
    assert per_seed["first"] | per_seed["second"] == {f"{s}[42]" for s in STAGES}, executed
    assert not per_seed["first"] & per_seed["second"], f"a stage ran in both flows: {executed}"
    _no_duplicate_work(seed_dir(tmp_path))
    assert stage_outputs(seed_dir(tmp_path), STAGES) == stage_outputs(seed_dir(micro_pipeline), STAGES)
