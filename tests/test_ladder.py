"""The quality ladder (issue 23): the tiny preset's rungs are stage 0's pre-training snapshots
(perplexity falls as steps rise), a hub ladder fetches revisions of the same model, a grid of two
variants climbs one ladder per (model, seed), and the report opens with "Robust or damaged?"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import micro_config


def test_grid_shares_one_ladder_from_stage0_snapshots_and_the_report_uses_it(tmp_path, monkeypatch):
    from monolm.controls import ladder
    from monolm.report import stage as one_cell
    from monolm.report.study import aggregate
    from monolm.study.cells import cells
    from monolm.study.dry_run import plan_study
    from monolm.study.sequential import run_study

    cfg = micro_config(tmp_path, 'grid.variants=["mlp_in","mlp_both"]')
    planned = [e for e in plan_study(cfg) if e.stage == "ladder"]
    assert [(e.where, e.seed) for e in planned] == [("tiny-neox/shared", 42)]  # visible in --dry-run, once

    climbs = []
    real = ladder._climb
    monkeypatch.setattr(ladder, "_climb", lambda *a, **k: climbs.append(1) or real(*a, **k))
    refs = run_study(cfg, progress=False)
    assert len(climbs) == 1  # two cells, one seed: one ladder
    dirs = {cell: seeds[42]["ladder"].dir for cell, seeds in refs.items()}
    assert len(set(dirs.values())) == 1

    report = json.loads((Path(next(iter(dirs.values()))) / "ladder.json").read_text())
    names = [r["name"] for r in report["rungs"]]
    assert names == ["step10", "step30", "base"]
    setup = refs[cells(cfg)[0].label][42]["setup"]
    assert set(setup.metrics["snapshots"]) >= {"step10", "step30"}
    ppl = [r["evaluation"]["token_perplexity"] for r in report["rungs"]]
    assert ppl[0] > ppl[1] > ppl[2], ppl  # quality rises with pre-training steps
    for rung in report["rungs"]:
        assert set(rung["attacks"]) == {"uat", "hotflip", "gcg"}
        assert len(rung["attacks"]["hotflip"]["clean"]) == cfg.attacks.hotflip.n_texts
        assert len(rung["attacks"]["gcg"]["attacked"]) == cfg.attacks.gcg.n_eval_texts
    assert report["not_attacked"] == []
    units = {p.name for p in (Path(next(iter(dirs.values()))) / "base" / "gcg" / "units").iterdir()}
    assert units and not any(u.startswith("gcg_control") for u in units)  # no random control on a rung

    cell = cells(cfg)[0]
    out = one_cell.run(cell.cfg.model_copy(update={"run_name": "ladder-report"}), [refs[cell.label][42]])
    md = Path(out["report"]).read_text()
    head, _, rest = md.partition("## Robust or damaged?")
    assert rest and "## Findings" not in head  # right after the headline
    assert "HotFlip increase vs a model of equal quality" in head  # the headline's quality-matched rows
    assert "robustness.png" in rest and (Path(out["dir"]) / "robustness.png").is_file()
    results = json.loads((Path(out["dir"]) / "results.json").read_text())
    for attack in ("uat", "hotflip", "gcg"):
        assert set(results["robust_or_damaged"]["attacks"][attack]["arms"]) == {"monotonic", "damage"}
        arm = results["robust_or_damaged"]["attacks"][attack]["arms"]["monotonic"]
        assert arm["ci_low"] <= arm["effective"] <= arm["ci_high"]
        assert arm["verdict"] in rest

    grid = aggregate(cfg.model_copy(update={"run_name": "ladder-grid"}), {c: [s[42]] for c, s in refs.items()})
    grid_md = Path(grid["report"]).read_text()
    assert grid_md.index("## Robust or damaged?") < grid_md.index("## Findings")
    assert "| mlp_in | abs |" in grid_md and "| mlp_both | abs |" in grid_md


def test_disabled_ladder_loads_no_model(tmp_path, monkeypatch):
    from monolm.controls import ladder
    from monolm.study.frame import StageRef
    from monolm.study.layout import cell_paths

    cfg = micro_config(tmp_path, "controls.ladder.enabled=false")
    monkeypatch.setattr(ladder, "_climb", lambda *a, **k: pytest.fail("climbed a disabled ladder"))
    setup = StageRef("setup", 42, str(tmp_path), "0" * 64, {"model_dir": str(tmp_path)})
    ref = ladder.run(cfg, cell_paths(cfg, 42), {"setup": setup}, progress=False)
    assert json.loads((ref.path / "ladder.json").read_text()) == {"enabled": False, "rungs": [], "not_attacked": []}


def test_hub_ladder_fetches_each_revision_of_the_same_model(tmp_path, monkeypatch):
    import huggingface_hub

    from monolm.config import load_config
    from monolm.controls.rungs import resolve_rungs
    from monolm.study.frame import StageRef

    fetched = []

    def stand_in(repo_id, revision, cache_dir, allow_patterns):  # a local folder per revision
        folder = tmp_path / "hub" / revision
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"")
        fetched.append((repo_id, revision))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", stand_in)
    cfg = load_config("full", sets=["controls.ladder.enabled=true", 'controls.ladder.rungs=["step3000","step33000"]'])
    setup = StageRef("setup", 42, str(tmp_path), "0" * 64, {"model_dir": str(tmp_path / "base")})
    rungs = resolve_rungs(cfg, setup)
    assert fetched == [(cfg.model.name, "step3000"), (cfg.model.name, "step33000")]
    assert [(r.name, r.path) for r in rungs] == [
        ("step3000", tmp_path / "hub" / "step3000"),
        ("step33000", tmp_path / "hub" / "step33000"),
        ("base", tmp_path / "base"),
    ]


def test_tiny_rungs_must_be_kept_snapshots(tmp_path):
    from monolm.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match="controls.ladder.rungs"):
        micro_config(tmp_path, 'controls.ladder.rungs=["step35"]')
    with pytest.raises((ConfigError, ValueError), match="controls.ladder.rungs"):
        micro_config(tmp_path, 'controls.ladder.rungs=["final"]')
    assert micro_config(tmp_path).controls.ladder.rungs == ["step10", "step30"]


def test_plan_shows_the_ladders_cost_per_rung():
    from monolm.config import load_config
    from monolm.memory.plans import plan_table

    def ladder_row(*sets):
        rows = plan_table(load_config("full", sets=list(sets)))[1]
        return {r["stage"]: r for r in rows}.get("ladder")

    four = ladder_row()  # the full preset: 4 revisions and the final model
    two = ladder_row('controls.ladder.rungs=["step3000","step8000"]')
    assert four["flops"] == pytest.approx(two["flops"] * 5 / 3)
    longer_gcg = ladder_row("attacks.gcg.steps=1000")  # GCG is part of every rung's cost
    assert longer_gcg["flops"] > four["flops"]
    assert four["a100_hours"] > 0
    assert ladder_row("controls.ladder.enabled=false") is None


def test_snapshots_survive_a_killed_pretraining_and_match_an_uninterrupted_run(tmp_path, monkeypatch):
    """Stage 0 killed right after pre-training's checkpoint at a snapshot step resumes there and
    keeps the same snapshot an uninterrupted run keeps (pausing at snapshots changes nothing)."""
    from monolm.core.artifacts import sha256_file
    from monolm.data import stage as setup_stage
    from monolm.models import loading
    from monolm.study.layout import cell_paths

    def snapshot_digests(cfg):
        ref = setup_stage.run(cfg, cell_paths(cfg, 42), {}, progress=False)
        return {name: sha256_file(Path(p) / "model.safetensors") for name, p in ref.metrics["snapshots"].items()}

    clean = snapshot_digests(micro_config(tmp_path / "a"))
    real_save = loading.save_model

    def killed_at_step30(model, tokenizer, out_dir):
        if Path(out_dir).name == "step30":
            raise KeyboardInterrupt("killed")
        return real_save(model, tokenizer, out_dir)

    cfg = micro_config(tmp_path / "b")
    monkeypatch.setattr(loading, "save_model", killed_at_step30)
    with pytest.raises(KeyboardInterrupt):
        setup_stage.run(cfg, cell_paths(cfg, 42), {}, progress=False)
    monkeypatch.setattr(loading, "save_model", real_save)
    assert snapshot_digests(cfg) == clean
    assert set(clean) == {"step10", "step20", "step30"}


def test_local_ladder_is_a_list_of_model_folders(tmp_path):
    from monolm.config import load_config
    from monolm.controls.rungs import resolve_rungs
    from monolm.models.loading import ModelError
    from monolm.study.frame import StageRef

    early = tmp_path / "early"
    early.mkdir()
    (early / "config.json").write_text("{}")
    sets = ["model.source=local", f"model.name={tmp_path / 'final'}", "controls.ladder.enabled=true"]
    setup = StageRef("setup", 42, str(tmp_path), "0" * 64, {"model_dir": str(tmp_path / "final")})
    cfg = load_config("full", sets=[*sets, f'controls.ladder.rungs=["{early}"]'])
    assert [r.path for r in resolve_rungs(cfg, setup)] == [early, tmp_path / "final"]
    missing = load_config("full", sets=[*sets, f'controls.ladder.rungs=["{tmp_path / "nowhere"}"]'])
    with pytest.raises(ModelError, match="controls.ladder.rungs"):
        resolve_rungs(missing, setup)
