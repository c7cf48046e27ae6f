"""Issue 13's proofs: the study as a grid of models x constraint variants x inits, with the work
that does not depend on the constraint done once per (model, seed) and reused by every cell, on a
real Prefect backend (task runs counted through its API), and what is refused before compute."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import micro_config, micro_sets

REPO = Path(__file__).resolve().parents[1]
SHARED = {"setup", "train_baseline", "evaluate_baseline", "uat_baseline", "hotflip_baseline", "gcg_baseline", "ladder"}
PER_CELL = {"constrain", "train_monotonic", "evaluate", "uat", "hotflip", "gcg", "damage"}


def run_grid(tmp: Path, *, variants=None, init=None, run_name="grid") -> dict:
    from flows.experiment import experiment

    return experiment(
        seeds=[42], preset="tiny", overrides=micro_sets(tmp), variants=variants, init=init, run_name=run_name
    )


def task_runs_of(flow_run_name: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        (stages,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[flow_run_name])))
        return [t for t in client.read_task_runs() if t.flow_run_id == stages.id]


def executed(result: dict) -> set[str]:
    """`<where>:<stage>` of every stage that ran rather than being a cache hit."""
    return {
        f"{where}:{stage}"
        for where, states in result["stage_states"].items()
        if isinstance(states, dict)
        for stage, state in states.items()
        if state != "Cached"
    } | ({"aggregate"} if result["stage_states"]["aggregate"] != "Cached" else set())


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_backend")
def test_grid_computes_shared_work_once_and_reruns_only_what_changed(tmp_path):
    # 1. Three variants, one seed: the baseline is trained (and evaluated and attacked) once.
    three = ["mlp_in", "mlp_both", "mlp_in_attn_out"]
    first = run_grid(tmp_path, variants=three, run_name="grid-a")
    runs = task_runs_of("grid-a-stages")
    names = [t.name.removesuffix("-seed-42") for t in runs]
    assert names.count("train-baseline") == 1 and names.count("setup") == 1, sorted(names)
    assert names.count("uat-baseline") == names.count("hotflip-baseline") == names.count("evaluate-baseline") == 1
    assert names.count("ladder") == 1  # the quality ladder: once per (model, seed), in the Prefect flow too
    assert names.count("train-monotonic") == names.count("constrain") == names.count("uat") == 3
    assert {t.state_name for t in runs} == {"Completed"}
    cfg = micro_config(tmp_path)
    model = Path(cfg.paths.runs_root) / "tiny" / "tiny-neox"
    assert sorted(p.name for p in model.iterdir()) == ["mlp_both-abs", "mlp_in-abs", "mlp_in_attn_out-abs", "shared"]
    assert sorted(
        p.name for p in (model / "shared" / "seed-42").iterdir() if (p / "manifest.json").is_file()
    ) == sorted(SHARED)
    trained = json.loads((model / "shared/seed-42/train_baseline/manifest.json").read_text())
    for variant in three:  # every cell's constrained arm was trained, and its evaluation used the one baseline
        cell = model / f"{variant}-abs" / "seed-42"
        assert (cell / "train_monotonic" / "manifest.json").is_file()
        evaluation = json.loads((cell / "evaluate" / "evaluation.json").read_text())
        assert list(evaluation["models"]) == ["base", "baseline", "monotonic"]
        uat_inputs = json.loads((cell / "uat" / "manifest.json").read_text())["inputs"]
        assert uat_inputs["train_baseline"] == _digest(model / "shared/seed-42/train_baseline")
    assert trained["stage"] == "train_baseline"
    results = Path(first["dir"])
    grid = json.loads((results / "grid.json").read_text())
    assert grid["cells"] == [f"tiny-neox/{v}-abs" for v in three]
    assert (results / "report.md").is_file() and (results / "tradeoff-tiny-neox.png").is_file()
    for variant in three:
        assert (results / "cells" / "tiny-neox" / f"{variant}-abs" / "results.json").is_file()

    # 2. A fourth cell (mlp_in with the clamp init) runs only its own stages, then stage 7.
    four = run_grid(tmp_path, variants=three, init=["abs", "clamp"], run_name="grid-a")
    assert executed(four) == {f"tiny-neox/{v}-clamp/seed-42:{s}" for v in three for s in PER_CELL} | {"aggregate"}

    # 3. Removing a variant re-runs only stage 7.
    two = run_grid(tmp_path, variants=three[:2], init=["abs", "clamp"], run_name="grid-a")
    assert executed(two) == {"aggregate"}, executed(two)
    assert json.loads((Path(two["dir"]) / "grid.json").read_text())["cells"] == [
        f"tiny-neox/{v}-{i}" for v in three[:2] for i in ("abs", "clamp")
    ]

    # The store holds the grid run's cells; two variants of one run compare like two runs.
    from monolm.store import ResultsStore

    with ResultsStore(cfg.store_url) as store:
        cells = {(r["model"], r["variant"], r["init"]) for r in store.query(run_id=two["run_id"])}
        assert cells == {("tiny-neox", v, i) for v in three[:2] for i in ("abs", "clamp")}
        rows = store.compare(f"{two['run_id']}@mlp_in-abs", f"{two['run_id']}@mlp_both-abs")
        ppl = next(
            r for r in rows if (r["arm"], r["stage"], r["metric"]) == ("baseline", "evaluate", "token_perplexity")
        )
        assert ppl["diff"] == 0  # the one shared baseline
        with pytest.raises(KeyError, match="grid of 4 cells"):
            store.compare(two["run_id"], two["run_id"])


def _digest(stage_dir: Path) -> str:
    import hashlib

    return hashlib.sha256((stage_dir / "manifest.json").read_bytes()).hexdigest()


def monolm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def micro_args(tmp: Path) -> list[str]:
    return [a for s in micro_sets(tmp) for a in ("--set", s)]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--variants", "mlp_in", "mlp_every"], "grid.variants.1: not an allowed value"),
        (["--variants", "mlp_in", "gated_all"], "constraint.variant='gated_all' does not fit model 'tiny-neox'"),
        (["--variants", "mlp_in", "mlp_in"], "grid.variants=['mlp_in', 'mlp_in'] lists 'mlp_in' more than once"),
        (["--models", "tiny-neox", "nope"], "grid.models: unknown model 'nope'; allowed: tiny-neox, tiny-neox-wide"),
        (["--models", "tiny-neox", "tiny-neox-wid"], "did you mean 'tiny-neox-wide'?"),
        (["--inits", "abs", "sqrt"], "grid.inits.1: not an allowed value"),
        (["--variant", "mlp_in", "--variants", "mlp_both"], "--variant and --variants"),
        (["--variants"], "expected at least one argument"),
    ],
)
def test_bad_grid_is_refused_before_any_compute(tmp_path, args, message):
    out = monolm("run", "--preset", "tiny", *args, *micro_args(tmp_path), cwd=tmp_path)
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()  # nothing was computed or written


def test_empty_axis_from_the_flow_is_refused():
    from monolm.config import ConfigError
    from monolm.study.cells import grid_from_lists

    with pytest.raises(ConfigError, match="grid.variants: an empty list"):
        grid_from_lists(None, [], None)


@pytest.mark.slow
def test_dry_run_counts_executions_and_what_is_done_already(tmp_path):
    args = ["run", "--preset", "tiny", "--variants", "mlp_in", "mlp_both", "--dry-run", *micro_args(tmp_path)]
    before = monolm(*args, cwd=tmp_path)
    assert before.returncode == 0, before.stderr
    assert "= 2 cell(s)" in before.stdout
    # 7 shared stages once (GCG's baseline share and the quality ladder among them), 7 per cell (GCG
    # and the damage-matched arm included), stage 7.
    assert "total: 22 stage executions, 0 done already (reused), 22 to run" in before.stdout
    assert any(line.split() == ["damage", "2", "0", "2"] for line in before.stdout.splitlines())
    assert any(line.split() == ["ladder", "1", "0", "1"] for line in before.stdout.splitlines())
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing
    one = monolm("run", "--preset", "tiny", "--no-prefect", "-q", *micro_args(tmp_path), cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    after = monolm(*args, cwd=tmp_path)
    # mlp_in's cell and the shared stages are done: 7 shared + 7 of the cell; mlp_both's 7 to run.
    assert "total: 22 stage executions, 14 done already (reused), 8 to run" in after.stdout, after.stdout
    assert after.stdout.splitlines()[2].split() == ["setup", "1", "1", "0"]


def test_variants_all_is_every_variant_the_architecture_has(tmp_path):
    out = monolm("run", "--preset", "tiny", "--variants", "all", "--dry-run", *micro_args(tmp_path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "3 variant(s) ['mlp_in', 'mlp_both', 'mlp_in_attn_out']" in out.stdout


def test_earlier_per_variant_layout_is_refused_with_what_to_do(tmp_path):
    old = tmp_path / "runs" / "tiny" / "tiny-neox" / "mlp_in" / "seed-42"
    (old / "setup").mkdir(parents=True)
    out = monolm("run", "--preset", "tiny", "--no-prefect", *micro_args(tmp_path), cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "earlier per-variant layout" in out.stderr and f"mv {old.parent} {old.parent}.v1" in out.stderr
    assert sorted(p.name for p in old.parent.parent.iterdir()) == ["mlp_in"]  # nothing new was written


def test_the_variants_deployment_runs_every_applicable_variant():
    from deployments.serve import deployment_specs

    specs = {s["name"]: s for s in deployment_specs()}
    assert specs["variants"]["parameters"]["variants"] == ["all"]
    assert specs["variants"]["entrypoint"] == specs["seed-42"]["entrypoint"]


def test_model_axis_names_folders_and_cells(tmp_path):
    from monolm.study.cells import cells
    from monolm.study.layout import cell_paths

    cfg = micro_config(tmp_path, "grid.models=[tiny-neox, tiny-neox-wide]", "grid.variants=[mlp_in, mlp_both]")
    study = cells(cfg)
    assert [c.label for c in study] == [
        "tiny-neox/mlp_in-abs",
        "tiny-neox/mlp_both-abs",
        "tiny-neox-wide/mlp_in-abs",
        "tiny-neox-wide/mlp_both-abs",
    ]
    wide = study[2].cfg
    assert wide.model.tiny.hidden_size == 192 and wide.constraint.variant == "mlp_in"
    paths = cell_paths(wide, 42)
    assert paths.stage("train_baseline").parent == Path(cfg.paths.runs_root) / "tiny" / "tiny-neox-wide/shared/seed-42"
    assert paths.stage("constrain").parent.parent.name == "mlp_in-abs"
    assert cfg.study_name == "tiny-neox+tiny-neox-wide-mlp_in+mlp_both-fair-seeds-42"


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_backend")
def test_a_grid_of_one_variant_reports_that_variant(tmp_path):
    """`--variants mlp_both` alone is a one-cell study: its results folder is a one-cell run's,
    under that cell's configuration (not the preset's default variant)."""
    result = run_grid(tmp_path, variants=["mlp_both"], run_name="one-cell")
    results = json.loads((Path(result["dir"]) / "results.json").read_text())
    assert results["meta"]["variant"] == "mlp_both" and not (Path(result["dir"]) / "grid.json").exists()
    assert set(result["stage_states"]) == {"42", "aggregate"}


class _Handed(Exception):
    """Stops `run_experiment` once it has called the flow (the flow itself runs in the tests above)."""


def test_monolm_run_hands_the_grid_to_the_flow_as_parameters(tmp_path, monkeypatch):
    """`monolm run --models/--variants/--inits` starts the flow with the grid as its parameters (what
    the UI and `monolm runs` show), not buried in `overrides`, and the flow resolves the same config."""
    import flows.experiment as fx
    from monolm.study.cells import grid_from_lists

    called: dict = {}

    def flow(**kwargs):
        called.update(kwargs)
        raise _Handed

    monkeypatch.setattr(fx, "experiment", flow)
    cfg = micro_config(
        tmp_path, "grid.models=[tiny-neox, tiny-neox-wide]", "grid.variants=[mlp_in, mlp_both]", "grid.inits=[abs]"
    )
    with pytest.raises(_Handed):
        fx.run_experiment(cfg)
    assert called["models"] == ["tiny-neox", "tiny-neox-wide"] and called["variants"] == ["mlp_in", "mlp_both"]
    assert called["init"] == ["abs"] and not [s for s in called["overrides"] if s.startswith("grid.")]
    grid = grid_from_lists(called["models"], called["variants"], called["init"])
    again = fx.resolve_config(
        called["preset"], called["seeds"], None, called["overrides"], None, called["run_name"], grid=grid
    )
    assert again.model_dump(exclude={"run_name"}) == cfg.model_dump(exclude={"run_name"})
    assert again.run_name == cfg.default_run_name  # the flow names an unnamed run as `monolm run` would
    # one cell (no grid): no grid parameters at all, as before the grid
    called.clear()
    with pytest.raises(_Handed):
        fx.run_experiment(micro_config(tmp_path))
    assert not {"models", "variants", "init"} & set(called)
