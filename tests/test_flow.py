"""Issue 4's proofs, on a real Prefect backend: the experiment flow caches exactly by what
determines each stage's output, retries resume instead of redoing work, and the cache-key
pitfalls seen with prefect 3.8.8 (INPUTS-only keys, TASK_SOURCE-only code versions) cannot bite."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import micro_config, micro_sets, stage_dir

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_backend")]

UPSTREAM = ("setup", "constrain", "train_baseline", "train_monotonic", "evaluate")
ATTACKS = ("uat", "hotflip")


def run(tmp: Path, *extra: str) -> dict:
    from flows.experiment import experiment

    return experiment(seeds=[42], preset="tiny", overrides=micro_sets(tmp, *extra))


def states(result: dict) -> dict[str, str]:
    out = dict(result["stage_states"]["42"])
    out["aggregate"] = result["stage_states"]["aggregate"]
    return out


def executed(result: dict) -> set[str]:
    return {stage for stage, state in states(result).items() if state != "Cached"}


def test_caching_reruns_exactly_what_changed(tmp_path):
    first = run(tmp_path)
    assert set(states(first).values()) == {"Completed"}, states(first)
    assert Path(first["report"]).is_file()

    # 1. Re-running a finished seed executes no stage.
    again = run(tmp_path)
    assert executed(again) == set(), states(again)
    assert again["digest"] == first["digest"]

    # 2. Changing an attack setting re-runs only stages 5-7.
    threshold = run(tmp_path, "attacks.success_threshold=0.05")
    attacks = {"uat_baseline", "uat", "hotflip_baseline", "hotflip", "gcg_baseline", "gcg"}  # baseline shares too
    # the damage-matched arm and the quality ladder are attacked with the same settings: they re-run with them
    assert executed(threshold) == {*attacks, "damage", "ladder", "aggregate"}, states(threshold)
    top_k = run(tmp_path, "attacks.success_threshold=0.05", "attacks.uat.top_k=4")
    assert executed(top_k) == {"uat_baseline", "uat", "damage", "ladder", "aggregate"}, states(top_k)

    # 3. Changing the learning rate re-runs 2/3 and everything downstream, not 0/1.
    lr = run(tmp_path, "attacks.success_threshold=0.05", "attacks.uat.top_k=4", "training.common.lr=1e-3")
    downstream = {"train_baseline", "train_monotonic", "evaluate_baseline", "evaluate", *attacks, "damage", "aggregate"}
    assert executed(lr) == downstream, states(lr)

    # 4. Deleting a stage's output folder forces that stage to re-run (a hit verifies its files).
    cfg = micro_config(tmp_path, "attacks.success_threshold=0.05", "attacks.uat.top_k=4", "training.common.lr=1e-3")

    shutil.rmtree(stage_dir(cfg, 42, "evaluate"))
    deleted = run(tmp_path, "attacks.success_threshold=0.05", "attacks.uat.top_k=4", "training.common.lr=1e-3")
    assert "evaluate" in executed(deleted) and not executed(deleted) & {"setup", "constrain", "train_baseline"}
    assert (stage_dir(cfg, 42, "evaluate") / "manifest.json").is_file()

    # 5. An altered (not deleted) output is a miss too.
    report = stage_dir(cfg, 42, "constrain") / "report.json"
    report.write_text(report.read_text().replace('"variant"', '"variant" ', 1))
    altered = run(tmp_path, "attacks.success_threshold=0.05", "attacks.uat.top_k=4", "training.common.lr=1e-3")
    assert "constrain" in executed(altered) and "setup" not in executed(altered)


def test_cache_key_pitfalls(tmp_path, monkeypatch):
    """Different stages with identical inputs get different keys; editing a library module a stage
    runs changes that stage's key (TASK_SOURCE alone would miss it), and only that stage's."""
    import monolm.core.code_digest as code_digest
    from tasks.common import stage_key

    cfg = micro_config(tmp_path)
    ref = {"stage": "x", "seed": 42, "dir": "/d", "digest": "abc", "metrics": {}}
    refs = {"setup": ref, "train_baseline": ref, "train_monotonic": ref}
    assert stage_key(cfg, "uat", 42, refs) != stage_key(cfg, "hotflip", 42, refs)

    before = {s: stage_key(cfg, s, 42, refs) for s in ("setup", "uat", "hotflip")}
    copy = tmp_path / "monolm"
    shutil.copytree(code_digest.PACKAGE_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "attacks" / "uat.py", "a") as fh:
        fh.write("\n# an edit to a helper the UAT stage calls\n")
    monkeypatch.setattr(code_digest, "PACKAGE_ROOT", copy)
    after = {s: stage_key(cfg, s, 42, refs) for s in ("setup", "uat", "hotflip")}
    assert after["uat"] != before["uat"] and after["hotflip"] != before["hotflip"]  # both run monolm.attacks
    assert after["setup"] == before["setup"]


def test_retry_resumes_instead_of_redoing(tmp_path, monkeypatch):
    """A stage that fails once succeeds on retry: training resumes from its last checkpoint, and
    the attack re-run after a failure does not redo the finished upstream stages."""
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"train_monotonic@3": 1, "uat": 1}))
    monkeypatch.setenv("MONOLM_FAULTS", str(faults))
    result = run(tmp_path)
    assert set(states(result).values()) == {"Completed"}, states(result)
    assert json.loads(faults.read_text()) == {"train_monotonic@3": 0, "uat": 0}  # both faults fired

    cfg = micro_config(tmp_path)

    history = json.loads((stage_dir(cfg, 42, "train_monotonic") / "history.json").read_text())
    assert [r["step"] for r in history["resumes"]] == [2]  # resumed from the step-2 checkpoint
    assert history["summary"]["steps_done"] == 4

    # The retried flow result is identical to a clean run's (cached now, nothing executes).
    again = run(tmp_path)
    assert executed(again) == set()


def test_cache_records_that_are_not_plain_json_are_never_trusted(tmp_path):
    """Prefect deserializes a hit with the serializer its record names: a pickle record (or JSON
    with a class-instantiating decoder) planted under the cache keys must be a miss."""
    from monolm.core.artifacts import atomic_write_json
    from tasks.common import _ref_sidecar, cache_dirs, cached_result_still_valid

    cfg = micro_config(tmp_path)
    keys = cache_dirs(cfg)[1]
    keys.mkdir(parents=True)
    output = tmp_path / "results.json"
    output.write_text("{}")
    atomic_write_json(_ref_sidecar(cfg, "k"), [{"dir": str(tmp_path), "digest": None, "files": [str(output)]}])
    record = keys / "k"
    record.write_text(json.dumps({"serializer": {"type": "json", "object_decoder": None}}))
    assert cached_result_still_valid(cfg, "k")
    for serializer in (
        {"type": "pickle", "picklelib": "cloudpickle"},
        {"type": "json", "object_decoder": "prefect.serializers.prefect_json_object_decoder"},
    ):
        record.write_text(json.dumps({"serializer": serializer}))
        assert not cached_result_still_valid(cfg, "k")
