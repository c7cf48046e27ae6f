"""Going back to an earlier config reuses its finished stage results (issue 24, finding 7).

Toggling `attacks.uat.trigger_len` 3 -> 4 -> 3 used to move the first finished `uat` folder to
`uat.superseded-<time>` and recompute it on the way back. A finished result superseded by a config
change is now kept under its work key and moved back when the config returns to it; `monolm clean`
lists the superseded folders and removes them only with `--yes`.
"""

from __future__ import annotations

import time
from pathlib import Path

from monolm.core.artifacts import atomic_write_json
from monolm.study.frame import SUPERSEDED, StageRef, existing, finish, prepare
from monolm.study.layout import cell_paths
from tests.helpers import micro_config

SEED = 42
INPUTS = {"train_baseline": StageRef("train_baseline", SEED, "/nowhere", "d" * 64)}


def run_uat(cfg, computed: list[int]) -> StageRef:
    """The shape of every stage function: reuse if finished, else prepare, compute, finish."""
    cell = cell_paths(cfg, SEED)
    done = existing(cfg, cell, "uat", INPUTS)
    if done:
        return done
    out = prepare(cfg, cell, "uat", INPUTS)
    computed.append(cfg.attacks.uat.trigger_len)
    atomic_write_json(out / "result.json", {"trigger_len": cfg.attacks.uat.trigger_len})
    return finish(cfg, cell, "uat", inputs=INPUTS, outputs=["result.json"], metrics={}, started=time.time())


def test_toggling_a_setting_back_reuses_the_first_result(tmp_path: Path) -> None:
    three, four = (micro_config(tmp_path, f"attacks.uat.trigger_len={n}") for n in (3, 4))
    computed: list[int] = []
    first = run_uat(three, computed)
    second = run_uat(four, computed)
    assert computed == [3, 4]
    assert second.digest != first.digest
    again = run_uat(three, computed)
    assert computed == [3, 4], "going back to trigger_len=3 recomputed instead of reusing"
    assert again.digest == first.digest and again.dir == first.dir
    assert (Path(again.dir) / "result.json").read_text().count('"trigger_len": 3') == 1
    # the trigger_len=4 result is kept in turn, and reused when the config comes back to it
    kept = [p.name for p in Path(first.dir).parent.iterdir() if SUPERSEDED in p.name]
    assert len(kept) == 1, kept
    assert run_uat(four, computed).digest == second.digest and computed == [3, 4]


def test_unfinished_work_of_another_config_is_moved_aside_by_time_and_never_reused(tmp_path: Path) -> None:
    three, four = (micro_config(tmp_path, f"attacks.uat.trigger_len={n}") for n in (3, 4))
    cell = cell_paths(three, SEED)
    prepare(three, cell, "uat", INPUTS)  # started, never finished (no manifest)
    (cell.stage("uat") / "partial.json").write_text("{}")
    computed: list[int] = []
    run_uat(four, computed)
    aside = [p for p in cell.stage("uat").parent.iterdir() if SUPERSEDED in p.name]
    assert len(aside) == 1 and (aside[0] / "partial.json").is_file()
    run_uat(three, computed)
    assert computed == [4, 3]  # nothing finished to reuse for 3: computed


def test_monolm_clean_lists_by_default_and_removes_with_yes(tmp_path: Path, capsys) -> None:
    from flows.cli import main

    three, four = (micro_config(tmp_path, f"attacks.uat.trigger_len={n}") for n in (3, 4))
    computed: list[int] = []
    run_uat(three, computed)
    run_uat(four, computed)
    root = tmp_path / "runs"
    assert main(["clean", "--runs-root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "1 superseded folder(s)" in out and "finished" in out and "dry run" in out
    assert [p for p in root.rglob(f"*{SUPERSEDED}*")]
    assert main(["clean", "--runs-root", str(root), "--yes"]) == 0
    assert not [p for p in root.rglob(f"*{SUPERSEDED}*")]
    assert (cell_paths(four, SEED).stage("uat") / "manifest.json").is_file()  # the current result stays
    assert main(["clean", "--runs-root", str(root)]) == 0
    assert "no superseded stage results" in capsys.readouterr().out
