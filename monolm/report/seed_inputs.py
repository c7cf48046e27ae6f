"""Stage 7's inputs: one seed's finished stages, each accepted only through its manifest.

Trust: `load_manifest` verifies every listed file's sha256, the manifest must be the very one the
pipeline handed over (its digest equals the StageRef's), and files are read with their recorded
digest. A corrupt or changed input is refused with its path, never silently summarised; so are
per-example losses that would make the paired tests over texts meaningless.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from monolm import report
from monolm.core.artifacts import MANIFEST, CorruptArtifact, load_manifest, read_json
from monolm.study import registry
from monolm.study.frame import StageRef


# The file stage 7 reads from each stage folder (besides the manifest's metrics).
def stage_file(name: str) -> str:
    return registry.stage(name).reads or ""


def _ref(ref: StageRef | Mapping[str, Any]) -> StageRef:
    if isinstance(ref, StageRef):
        return ref
    return StageRef.from_json({k: ref[k] for k in ("stage", "seed", "dir", "digest", "metrics")})


def _load_stage(name: str, ref: StageRef) -> dict[str, Any]:
    """The verified manifest of one input stage as a plain record."""
    directory = Path(ref.dir)
    path = directory / MANIFEST
    if name not in registry.seed_stage_names():
        raise ValueError(
            f"unknown input stage {name!r} for seed {ref.seed}; known: {', '.join(registry.seed_stage_names())}"
        )
    try:
        manifest, digest = load_manifest(directory)  # verifies every output's sha256
    except FileNotFoundError:
        raise CorruptArtifact(
            path, f"missing: stage {name} of seed {ref.seed} has no manifest (it did not finish)"
        ) from None
    if manifest.stage != name:
        raise CorruptArtifact(path, f"is the manifest of stage {manifest.stage!r}, expected {name!r}")
    if digest != ref.digest:
        raise CorruptArtifact(
            path,
            f"sha256 {digest[:12]}… differs from the digest the pipeline passed "
            f"({ref.digest[:12]}…): the stage was re-run or altered after it finished",
        )
    return {
        "dir": str(directory.resolve()),
        "digest": digest,
        "metrics": manifest.metrics,
        "outputs": manifest.outputs,
        "wall_time_s": manifest.wall_time_s,
        "git_revision": (manifest.provenance or {}).get("git_revision"),
        "code_version": manifest.metrics.get("code_version"),
    }


def _read_output(stage: dict[str, Any], name: str, rel: str) -> Any:
    path = Path(stage["dir"]) / rel
    if rel not in stage["outputs"]:
        raise CorruptArtifact(path, f"stage {name} does not list {rel} in its manifest")
    return read_json(path, expected_sha256=stage["outputs"][rel])


def _check_per_example(name: str, stage: dict[str, Any], per_example: dict[str, Any]) -> None:
    """per_example.json must hold both arms' losses on the same texts and agree with the stage's
    own summary; otherwise the paired tests over texts would be meaningless."""
    path = Path(stage["dir"]) / stage_file(name)
    per_model = stage["metrics"].get("per_model") or {}
    lengths = set()
    for arm in report.ARMS:
        if arm not in per_example:
            if arm in per_model:
                raise CorruptArtifact(path, f"has no per-example losses for the {arm} arm")
            continue
        try:
            effects = report.example_effects(per_example, arm)
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptArtifact(path, f"malformed entry for {arm}: {exc}") from None
        lengths.add(effects["abs_increase"].size)
        _check_control(path, arm, per_example[arm], effects["abs_increase"].size)
        rec = per_model.get(arm) or {}
        if rec.get("n") is not None and rec["n"] != effects["abs_increase"].size:
            raise CorruptArtifact(
                path, f"{arm}: {effects['abs_increase'].size} texts, but the stage reports n={rec['n']}"
            )
        if (
            rec.get("abs_increase") is not None
            and effects["abs_increase"].size
            and not np.isclose(effects["abs_increase"].mean(), rec["abs_increase"], rtol=1e-6, atol=1e-9)
        ):
            raise CorruptArtifact(
                path,
                f"{arm}: mean per-text increase {effects['abs_increase'].mean():.6g} differs from "
                f"the stage's abs_increase {rec['abs_increase']:.6g}",
            )
    if len(lengths) > 1:
        raise CorruptArtifact(
            path,
            f"the arms were attacked on different numbers of texts {sorted(lengths)}; paired tests need the same texts",
        )


def _check_control(path: Path, arm: str, record: dict[str, Any], n_texts: int) -> None:
    """An arm's random-control losses (HotFlip) must be on the arm's texts: as many, well formed."""
    if "control" not in record:
        return
    try:
        n_control = report.example_effects(record, "control")["abs_increase"].size
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptArtifact(path, f"malformed control entry for {arm}: {exc}") from None
    if n_control != n_texts:
        raise CorruptArtifact(path, f"{arm}: {n_control} control texts but {n_texts} attacked texts")


def read_seed(refs: Mapping[str, StageRef | Mapping[str, Any]]) -> dict[str, Any]:
    """One seed's verified inputs as the plain dict `monolm.report` works on (`SeedData`):
    {seed, stages: {name: {dir, digest, metrics, outputs, wall_time_s, git_revision, code_version}},
    constrain, evaluation, histories: {arm: history}, per_example: {attack: {arm: {clean, attacked}}}}."""
    if not refs:
        raise ValueError("a seed without any stage results")
    refs = {name: _ref(ref) for name, ref in refs.items()}
    seeds = {ref.seed for ref in refs.values()}
    if len(seeds) != 1:
        raise ValueError(f"stage results of different seeds {sorted(seeds)} were passed as one seed")
    seed = seeds.pop()
    stages = {name: _load_stage(name, ref) for name, ref in refs.items()}
    data: dict[str, Any] = {
        "seed": seed,
        "stages": stages,
        "constrain": None,
        "evaluation": None,
        "histories": {},
        "per_example": {},
    }
    if "constrain" in stages:
        data["constrain"] = _read_output(stages["constrain"], "constrain", stage_file("constrain"))
    if "evaluate" in stages:
        data["evaluation"] = _read_output(stages["evaluate"], "evaluate", stage_file("evaluate"))
    if "ladder" in stages:  # the quality ladder (monolm.controls.ladder), for "Robust or damaged?"
        data["ladder"] = _read_output(stages["ladder"], "ladder", stage_file("ladder"))
    for arm in report.ARMS:
        name = f"train_{arm}"
        if name in stages:
            data["histories"][arm] = _read_output(stages[name], name, stage_file(name))
    if stage_file("damage") in (stages.get("damage") or {}).get("outputs", {}):  # the damage-matched arm, if on
        data["damage"] = _read_output(stages["damage"], "damage", stage_file("damage"))
    for attack in report.ATTACKS:
        if attack in stages:
            per_example = _read_output(stages[attack], attack, stage_file(attack))
            _check_per_example(attack, stages[attack], per_example)
            data["per_example"][attack] = per_example
    return data
