"""The report of a real (micro) run as a reader meets it: each interval computed once and the same
in every file that shows it, the triggers and a few HotFlip examples shown, gradient HotFlip
tested against its random control, readable labels and the run ID."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import micro_config

from monolm.core.artifacts import load_manifest
from monolm.report.formatting import fmt_ci


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from monolm.report import stage as aggregate
    from monolm.study.sequential import run_seed

    cfg = micro_config(tmp_path_factory.mktemp("run"))
    refs = run_seed(cfg, 42, progress=False)
    out = aggregate.run(cfg, [refs])
    results = json.loads(Path(out["dir"], "results.json").read_text())
    return refs, out, results, Path(out["report"]).read_text()


def _ci(effect: dict) -> list[float]:
    return [effect["ci_low"], effect["ci_high"]]


@pytest.mark.parametrize("attack", ["uat", "hotflip", "gcg"])
def test_one_number_one_interval_in_every_file(run, attack):
    """The same arm's absolute increase on the same texts has one interval: in the attack's
    results file, the diagonal of its transfer matrix, the stage manifest, results.json, the store
    rows' source and report.md."""
    refs, _, results, md = run
    folder = Path(refs[attack].dir)
    own = json.loads((folder / f"{attack}_results.json").read_text())
    transfer = json.loads((folder / "transfer.json").read_text())
    manifest, _ = load_manifest(folder)
    for arm in ("baseline", "monotonic"):
        effect = {"uat": own[arm].get("eval"), "hotflip": own[arm].get("gradient")}.get(attack) or own[arm]["gcg"][
            "eval"
        ]
        diagonal = transfer["cells"][arm][arm]
        assert diagonal["abs_increase"]["mean"] == effect["abs_increase"]["mean"]  # the same texts and losses
        assert _ci(diagonal["abs_increase"]) == _ci(effect["abs_increase"])
        assert manifest.metrics["per_model"][arm]["abs_increase_ci"] == _ci(effect["abs_increase"])
        summary = next(
            s for s in results["summaries"] if (s["stage"], s["model"], s["metric"]) == (attack, arm, "abs_increase")
        )
        assert _ci(summary) == _ci(effect["abs_increase"])
        assert fmt_ci(summary) in md


def test_report_shows_triggers_examples_control_test_and_run_id(run):
    refs, out, results, md = run
    triggers = json.loads(Path(refs["uat"].dir, "triggers.json").read_text())
    section = md.split("## Attack examples")[1].split("\n## ")[0]
    for arm in ("baseline", "monotonic"):
        assert " ".join(str(i) for i in triggers[arm]["trigger_ids"]) in section
    examples = results["examples"]["hotflip"]
    assert {e["arm"] for e in examples} == {"baseline", "monotonic"} and len(examples) == 6
    assert all(e["before"].count("⟦") == e["flips"] == e["after"].count("⟦") for e in examples)
    assert "⟦" in section and "Before" in section
    assert "⟦" not in Path(out["dir"], "tables.tex").read_text()  # attacked text stays out of the paper tables

    control = [c for c in results["comparisons"] if c["metric"].startswith("gradient_vs_control_")]
    assert [(c["stage"], c["metric"], c["scope"], c["seed"], c["n"]) for c in control] == [
        (attack, f"gradient_vs_control_{arm}", "texts", 42, 8)
        for attack in ("hotflip", "gcg")
        for arm in ("baseline", "monotonic")
    ]
    findings = md.split("## Findings")[1].split("\n## ")[0]
    assert findings.count("HotFlip vs its random-candidate control on the") == 2 and "n=8 texts" in findings
    assert findings.count("GCG vs its random-candidate control on the") == 2
    gcg_triggers = json.loads(Path(refs["gcg"].dir, "triggers.json").read_text())
    for arm in ("baseline", "monotonic"):
        assert " ".join(str(i) for i in gcg_triggers[arm]["trigger_ids"]) in section
    budget_caption = (
        "budget curves: best optimisation loss vs share of the budget per arm (faint: restarts; bold: their mean"
    )
    assert f"_UAT {budget_caption})._" in md, "UAT has no random control, so its caption names none"
    assert f"_GCG {budget_caption}; dashed: the random control)._" in md
    for attack in ("uat", "gcg"):  # budget curves: a figure and a saturation sentence per arm
        assert f"budget-{attack}.png" in md and Path(out["report"]).with_name(f"budget-{attack}.png").is_file()
        for arm in ("baseline", "monotonic"):
            (row,) = [r for r in results["saturation"] if (r["attack"], r["arm"], r["kind"]) == (attack, arm, "attack")]
            assert row["sentence"] in findings
    assert any(c["metric"] == "restart_mean_abs_increase" for c in results["comparisons"])
    # Which robustness differences survive the quality control: one sentence per attack the ladder covers.
    assert set(results["robust_or_damaged"]["attacks"]) == {"uat", "hotflip", "gcg"}
    from monolm.report.stage import store_rows

    stored = {(r["stage"], r["arm"], r["metric"]): r for r in store_rows(results)}
    for attack, rec in results["robust_or_damaged"]["attacks"].items():  # effective robustness in the store
        for arm, r in rec["arms"].items():
            row = stored[(attack, "damage-matched" if arm == "damage" else arm, "effective_robustness:value")]
            assert row["value"] == r["effective"] and row["extra"]["verdict"] == r["verdict"]
            assert stored[(attack, row["arm"], "effective_robustness:ci_high")]["value"] == r["ci_high"]
    for attack in results["robust_or_damaged"]["attacks"]:
        label = {"uat": "UAT", "hotflip": "HotFlip", "gcg": "GCG"}[attack]
        assert findings.count(f"{label}, quality-controlled: ") == 1

    tests = md.split("## Paired tests")[1].split("\n## ")[0]
    assert "doc_loss" not in tests and "| per-document loss (nats/token) | seed 42, over documents |" in tests
    for label in ("HotFlip", "GCG"):  # each control test is named after its own attack
        for arm in ("baseline", "monotonic"):
            assert tests.count(f"| {label} gradient − control ({arm}) | seed 42, over texts | 8 |") == 1
    assert f"Run ID `{out['run_id']}`" in md and "tiny-tiny" not in out["run_id"]


def test_the_damage_matched_arm_is_run_reported_and_reused(run, tmp_path):
    """The damage stage of a micro run: matched within the tolerance (or says it is not), attacked
    with every attack, in the headline with its paired tests; a second run reuses it."""
    from monolm.study.frame import existing
    from monolm.study.layout import cell_paths

    refs, _, results, md = run
    cfg = micro_config(Path(refs["setup"].dir).parents[5])  # the run's own folders
    damage, tolerance = refs["damage"].metrics, cfg.controls.damage.tolerance
    assert damage["enabled"] and damage["bisection_steps"] <= cfg.controls.damage.max_steps
    assert damage["within_tolerance"] == (abs(damage["val_loss"] - damage["target_val_loss"]) <= tolerance)
    assert damage["not_attacked"] == {}
    assert set(damage["per_model"]) == {"uat", "hotflip", "gcg"}
    head = md.split("## What was run")[0]
    assert "| Damage-matched |" in head and "constrained vs damage-matched" in head
    for attack in ("hotflip", "gcg"):  # every attack the damage arm ran is compared with it
        assert any(c["b"] == "damage-matched" and c["stage"] == attack for c in results["comparisons"])
    inputs = {name: refs[name] for name in ("setup", "train_baseline", "train_monotonic")}
    again = existing(cfg, cell_paths(cfg, 42), "damage", inputs)
    assert again is not None and again.digest == refs["damage"].digest
    constrain = refs["constrain"].metrics
    assert 0.0 <= constrain["frozen_share"] <= 1.0
    assert set(refs["train_monotonic"].metrics["frozen"]) == {"start", "end"}


def test_a_disabled_damage_arm_records_only_that_it_was_off(run, tmp_path):
    from monolm.controls.stage import run as run_damage
    from monolm.report.stage import read_seed
    from monolm.study.layout import cell_paths

    refs, _, _, _ = run
    cfg = micro_config(tmp_path, "controls.damage.enabled=false")  # its own runs folder
    inputs = {name: refs[name] for name in ("setup", "train_baseline", "train_monotonic")}
    off = run_damage(cfg, cell_paths(cfg, 42), inputs, progress=False)
    assert off.metrics["enabled"] is False and not (off.path / "damage.json").exists()
    assert "damage" not in read_seed({**refs, "damage": off})  # the report has no damage-matched arm
