"""Corrupt or partial files at the stage level: a truncated or bit-flipped manifest, a results file
altered, truncated or deleted after its stage finished. Each is detected by its sha256, reported
with its path, and only the affected stages are recomputed, to exactly the outputs of an intact
run. Temp files that look like finished outputs are never opened. A Prefect cache hit is allowed
only while the files it points to still verify. (Checkpoints and attack units: see the kill tests.)

Each test works on its own copy of the session's micro pipeline.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from monolm.study.registry import SEED_STAGE_NAMES
from resilience.helpers import flip_bit, micro_argv, read_audit, run_cli, seed_dir, stage_outputs, temp_reads, truncate

pytestmark = pytest.mark.resilience

STAGES = SEED_STAGE_NAMES  # every per-seed stage, in the order they run


def copy_pipeline(micro_pipeline: Path, root: Path) -> Path:
    shutil.copytree(micro_pipeline / "runs", root / "runs")
    return root


def manifests(root: Path) -> dict[str, bytes]:
    return {s: (seed_dir(root) / s / "manifest.json").read_bytes() for s in STAGES}


def rerun(root: Path, **kw) -> str:
    code, out = run_cli(micro_argv(root), cwd=root, **kw)
    assert code == 0, out[-4000:]
    return out


def warned(out: str, path: Path, reason: str) -> None:
    lines = [line for line in out.splitlines() if "WARNING" in line and str(path) in line]
    assert any(reason in line for line in lines), f"no warning naming {path} ({reason}):\n{out[-4000:]}"


def test_damaged_results_files_rerun_only_their_stages(tmp_path, micro_pipeline):
    root = copy_pipeline(micro_pipeline, tmp_path)
    sd = seed_dir(root)
    before = manifests(root)
    flip_bit(sd / "evaluate" / "evaluation.json", 10)
    truncate(sd / "uat" / "uat_results.json", 0.5)
    (sd / "hotflip" / "per_example.json").unlink()
    out = rerun(root)
    warned(out, sd / "evaluate" / "evaluation.json", "sha256 differs from the manifest")
    warned(out, sd / "uat" / "uat_results.json", "sha256 differs from the manifest")
    warned(out, sd / "hotflip" / "per_example.json", "listed in the manifest but missing")
    after = manifests(root)
    assert [s for s in STAGES if after[s] != before[s]] == ["evaluate", "uat", "hotflip"]
    assert stage_outputs(sd, STAGES) == stage_outputs(seed_dir(micro_pipeline), STAGES)


def _downstream(stages: set[str]) -> set[str]:
    """`stages` and every per-seed stage whose inputs reach one of them."""
    from monolm.study.registry import seed_stages

    out = set(stages)
    for stage in seed_stages():  # in run order: a stage's inputs come before it
        if out & set(stage.inputs):
            out.add(stage.name)
    return out


def test_damaged_manifests_are_not_trusted(tmp_path, micro_pipeline):
    """constrain's manifest with one recorded digest altered, train_baseline's truncated: neither
    is reused; downstream stages see new input digests and recompute; the baseline arm resumes
    from its own final checkpoint instead of training again; outputs equal the intact run's."""
    root = copy_pipeline(micro_pipeline, tmp_path)
    sd = seed_dir(root)
    before = manifests(root)
    data = json.loads(before["constrain"])
    rel = "report.json"
    digest = data["outputs"][rel]
    data["outputs"][rel] = ("0" if digest[0] != "0" else "1") + digest[1:]
    (sd / "constrain" / "manifest.json").write_text(json.dumps(data, indent=2) + "\n")
    truncate(sd / "train_baseline" / "manifest.json", 0.5)
    out = rerun(root)
    warned(out, sd / "constrain" / rel, "sha256 differs from the manifest")
    warned(out, sd / "train_baseline" / "manifest.json", "unreadable manifest")
    assert f"resuming {sd / 'train_baseline'} from {sd / 'train_baseline' / 'checkpoints' / 'step-00000004'}" in out
    after = manifests(root)
    # Every stage that depends, directly or not, on a damaged one is recomputed; the others (stage
    # 0, and model-shared work that reads only stage 0, like the quality ladder) are reused as is.
    damaged = _downstream({"constrain", "train_baseline"})
    assert {s for s in STAGES if after[s] != before[s]} == damaged
    assert damaged >= {"constrain", "train_baseline", "train_monotonic", "evaluate", "uat", "hotflip"}
    assert stage_outputs(sd, STAGES) == stage_outputs(seed_dir(micro_pipeline), STAGES)


def test_temp_files_that_look_finished_are_never_read(tmp_path, micro_pipeline):
    """Decoys a killed writer could have left, each a complete copy of a real output under its
    temp name: a manifest, a checkpoint with a later step, a best model, an attack unit. Two
    stages are made unfinished so they resume next to the decoys; the audited re-run never opens
    one and ends with the intact run's outputs."""
    root = copy_pipeline(micro_pipeline, tmp_path)
    sd = seed_dir(root)
    for stage in STAGES:
        shutil.copy(sd / stage / "manifest.json", sd / stage / ".tmp-manifest.json.decoy1")
    ckpts = sd / "train_baseline" / "checkpoints"
    shutil.copytree(ckpts / "step-00000004", ckpts / ".tmp-step-00000099-decoy2")
    shutil.copytree(sd / "train_baseline" / "best", sd / "train_baseline" / ".tmp-best-decoy3")
    units = sd / "uat_baseline" / "baseline" / "units"  # the baseline's share of stage 5
    shutil.copy(units / "uat-0000.json", units / ".tmp-uat-0000.json.decoy4")
    for stage in ("train_baseline", "uat"):
        (sd / stage / "manifest.json").unlink()

    audit = tmp_path / "rerun.audit"
    rerun(root, audit={"log": str(audit), "root": str(root)})
    records = read_audit(audit)
    assert records, "the audit hook recorded nothing"
    assert temp_reads(records) == []
    assert stage_outputs(sd, STAGES) == stage_outputs(seed_dir(micro_pipeline), STAGES)


def test_prefect_cache_hit_requires_intact_files(tmp_path, micro_pipeline):
    """`tasks.common.cached_result_still_valid` (what decides whether Prefect may return a cached
    stage result): true for an intact stage, false once any file it names is altered, truncated
    or missing, its manifest was rewritten by a re-run, or the record itself is damaged."""
    from monolm.config import load_config
    from monolm.core.artifacts import load_manifest
    from resilience.helpers import micro_sets
    from tasks.common import _ref_sidecar, cache_dirs, cached_result_still_valid

    root = copy_pipeline(micro_pipeline, tmp_path)
    cfg = load_config("tiny", sets=micro_sets(root))
    stage = seed_dir(root) / "evaluate"
    _, digest = load_manifest(stage)
    sidecar = _ref_sidecar(cfg, "key-1")
    sidecar.parent.mkdir(parents=True, exist_ok=True)
    # Prefect's record of the cached result, as it writes one (plain JSON serializer).
    record = cache_dirs(cfg)[1] / "key-1"
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"storage_key": "key-1", "serializer": {"type": "json", "object_decoder": None}}))

    def remember() -> None:
        sidecar.write_text(json.dumps([{"dir": str(stage), "digest": digest, "files": []}]))

    remember()
    assert cached_result_still_valid(cfg, "key-1")
    assert not cached_result_still_valid(cfg, "key-unknown")  # no record: a miss

    original = (stage / "evaluation.json").read_bytes()
    for damage in (lambda p: flip_bit(p, 5), lambda p: truncate(p, 0.5), lambda p: p.unlink()):
        damage(stage / "evaluation.json")
        assert not cached_result_still_valid(cfg, "key-1")
        (stage / "evaluation.json").write_bytes(original)
        assert cached_result_still_valid(cfg, "key-1")

    manifest = (stage / "manifest.json").read_bytes()
    truncate(stage / "manifest.json", 0.5)
    assert not cached_result_still_valid(cfg, "key-1")
    (stage / "manifest.json").write_bytes(manifest.replace(b'"n_docs"', b'"n_docs" ', 1))  # a re-run's manifest
    assert not cached_result_still_valid(cfg, "key-1")
    (stage / "manifest.json").write_bytes(manifest)
    assert cached_result_still_valid(cfg, "key-1")

    sidecar.write_text(sidecar.read_text()[:20])  # the record itself truncated
    assert not cached_result_still_valid(cfg, "key-1")
