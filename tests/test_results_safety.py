"""Results are never lost (issue 21): stage 7 replaces only a results folder of the same run,
names runs of different configurations apart, serialises publishes of one name, and repairs a
publish killed at any step so that the folder and the store agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_report import NUMBERS, make_cfg, make_seed  # noqa: E402

from monolm.config import ConfigError, load_config  # noqa: E402
from monolm.core.artifacts import load_manifest  # noqa: E402
from monolm.report import stage as aggregate  # noqa: E402
from monolm.report.publish import NotAResultsFolder, publish_lock, recover  # noqa: E402
from monolm.store import ResultsStore  # noqa: E402

pytestmark = pytest.mark.security
REPO = Path(__file__).resolve().parents[1]


def _no_leftovers(root: Path) -> bool:
    return not [p for p in root.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_home_folder_named_as_the_run_is_refused_and_kept(tmp_path):
    home = tmp_path / "home"
    (home / "Documents" / "thesis").mkdir(parents=True)
    (home / "Documents" / "thesis" / "main.tex").write_text("years of work")
    (home / "Documents" / "notes.txt").write_text("notes")
    before = _tree(home)
    cfg = make_cfg(
        tmp_path, [42], run_name="Documents", paths={"runs_root": str(tmp_path / "runs"), "results_root": str(home)}
    )
    refs = make_seed(cfg, 42, NUMBERS[42])
    with pytest.raises(NotAResultsFolder, match="run_name: .* is not a monolm results folder"):
        aggregate.run(cfg, [refs])
    assert _tree(home) == before and _no_leftovers(home)
    with ResultsStore(cfg.store_url) as store:
        assert store.runs() == []


def test_a_glob_in_the_run_name_is_refused_and_nothing_is_touched(tmp_path):
    with pytest.raises(ConfigError, match="run_name: not a folder name"):
        load_config("tiny", extra={"run_name": "*"})
    cfg = make_cfg(tmp_path, [42])
    refs = make_seed(cfg, 42, NUMBERS[42])
    aggregate.run(cfg, [refs])
    root = tmp_path / "results"
    (root / ".old-x-1").mkdir()  # what a `*` glob of the backups would have matched
    (root / ".tmp-synthetic-run-2-abcdefgh").mkdir()  # another run's (`synthetic-run-2`) temp folder
    before = _tree(root)
    with pytest.raises(ValueError, match="run_name: not a folder name"):
        aggregate.run(cfg.model_copy(update={"run_name": "*"}), [refs])  # unvalidated copy: the stage checks too
    assert _tree(root) == before and (root / ".old-x-1").is_dir()
    aggregate.run(cfg, [refs])  # this name's publish leaves the other name's folders alone
    assert (root / ".tmp-synthetic-run-2-abcdefgh").is_dir()


def test_two_learning_rates_keep_both_reports(tmp_path):
    first_cfg = make_cfg(tmp_path, [42], run_name=None)
    refs = make_seed(first_cfg, 42, NUMBERS[42])
    first = aggregate.run(first_cfg, [refs])
    second_cfg = make_cfg(tmp_path, [42], run_name=None, training={"common": {"lr": 1e-3}})
    second = aggregate.run(second_cfg, [refs])
    assert first["dir"] != second["dir"]
    assert Path(first["report"]).is_file() and Path(second["report"]).is_file()
    assert second["earlier"] == [Path(first["dir"]).name]  # the run says which earlier run it kept
    again = aggregate.run(first_cfg, [refs])  # the same configuration replaces its own folder
    assert again["dir"] == first["dir"] and _no_leftovers(tmp_path / "results")
    assert len([p for p in (tmp_path / "results").iterdir() if p.is_dir()]) == 2


def test_an_explicit_name_reused_with_another_config_keeps_the_earlier_results(tmp_path):
    first_cfg = make_cfg(tmp_path, [42], run_name="mine")
    refs = make_seed(first_cfg, 42, NUMBERS[42])
    first = aggregate.run(first_cfg, [refs])
    before = _tree(Path(first["dir"]))
    second = aggregate.run(make_cfg(tmp_path, [42], run_name="mine", training={"common": {"lr": 1e-3}}), [refs])
    kept = tmp_path / "results" / f"mine-{first_cfg.study_digest()[:8]}"
    assert second["dir"] == first["dir"] and second["earlier"] == [kept.name]
    assert _tree(kept) == before  # the first configuration's report, moved aside whole
    load_manifest(kept)
    second_digest = make_cfg(tmp_path, [42], run_name="mine", training={"common": {"lr": 1e-3}}).study_digest()
    aggregate.run(first_cfg, [refs])  # the first configuration again: the second's results move aside too
    folders = {p.name for p in (tmp_path / "results").iterdir() if p.is_dir()}
    assert folders == {"mine", kept.name, f"mine-{second_digest[:8]}"}


# --------------------------------------------------------------------------- in other processes
RUNNER = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from pathlib import Path
    args = json.loads(Path(sys.argv[1]).read_text())
    from monolm.config import load_config
    from monolm.report import publish, stage
    from monolm.store import ResultsStore

    def kill_at(owner, name, when):
        real = getattr(owner, name)
        def wrapped(*a, **k):
            if when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            out = real(*a, **k)
            os.kill(os.getpid(), signal.SIGKILL)
            return out
        setattr(owner, name, wrapped)

    def wait_for_other(name, other):
        real = getattr(publish, name)
        def wrapped(*a, **k):
            deadline = time.time() + 60
            while not Path(other).exists() and time.time() < deadline:
                time.sleep(0.01)
            return real(*a, **k)
        setattr(publish, name, wrapped)

    if args.get("kill"):
        name, when = args["kill"]
        kill_at(ResultsStore if name == "record_run" else publish, name, when)
    if args.get("other"):
        wait_for_other("_put_in_place", args["other"])
    cfg = load_config("tiny", extra=args["extra"])
    Path(args["started"]).write_text("")
    stage.run(cfg, args["seeds"])
    """
)


def _runner(tmp_path: Path, tag: str, cfg_extra: dict, seeds: list, **more) -> subprocess.Popen:
    args = {"extra": cfg_extra, "seeds": seeds, "started": str(tmp_path / f"started-{tag}"), **more}
    (tmp_path / f"args-{tag}.json").write_text(json.dumps(args))
    (tmp_path / "runner.py").write_text(RUNNER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    return subprocess.Popen(
        [sys.executable, str(tmp_path / "runner.py"), str(tmp_path / f"args-{tag}.json")],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )


def _extra(tmp_path: Path) -> dict:
    return {
        "paths": {"runs_root": str(tmp_path / "runs"), "results_root": str(tmp_path / "results")},
        "seeds": [42],
        "run_name": "synthetic-run",
    }


def _seeds_json(refs) -> list:
    return [{name: ref.to_json() for name, ref in refs.items()}]


def test_two_concurrent_publishes_of_one_name_both_end_complete(tmp_path):
    cfg = make_cfg(tmp_path, [42])
    refs = make_seed(cfg, 42, NUMBERS[42])
    aggregate.run(cfg, [refs])  # a previous folder that both will replace
    seeds = _seeds_json(refs)
    procs = [
        _runner(tmp_path, tag, _extra(tmp_path), seeds, other=str(tmp_path / f"started-{other}"))
        for tag, other in (("a", "b"), ("b", "a"))
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    root = tmp_path / "results"
    manifest, _ = load_manifest(root / "synthetic-run")  # complete: every file's sha256 checks
    assert _no_leftovers(root)
    with ResultsStore(cfg.store_url) as store:
        row = store.get_run(aggregate.run_id_for(cfg, "synthetic-run"))
    assert row is not None and abs(_ts(row) - manifest.created_at) < 1e-3


def _ts(row) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(row["created_at"]).timestamp()


KILL_POINTS = [
    ("_move_aside", "before", "old"),
    ("_move_aside", "after", "old"),
    ("_put_in_place", "after", "old"),
    ("record_run", "after", "new"),
    ("_drop_backup", "before", "new"),
]


@pytest.mark.parametrize(("step", "when", "kept"), KILL_POINTS, ids=[f"{w}-{s}" for s, w, _ in KILL_POINTS])
def test_a_kill_at_each_step_of_publishing_leaves_a_folder_the_store_agrees_with(tmp_path, step, when, kept):
    cfg = make_cfg(tmp_path, [42])
    refs = make_seed(cfg, 42, NUMBERS[42])
    first = aggregate.run(cfg, [refs])
    root, final = tmp_path / "results", Path(first["dir"])
    old_created = load_manifest(final)[0].created_at
    proc = _runner(tmp_path, "k", _extra(tmp_path), _seeds_json(refs), kill=[step, when])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -9, err[-3000:]  # killed where asked
    with ResultsStore(cfg.store_url) as store, publish_lock(root, final.name):
        recover(root, final.name, store)  # what the next publish of the name does first
        row = store.get_run(first["run_id"])
    manifest, _ = load_manifest(final)  # a complete folder is in place
    assert (manifest.created_at == old_created) == (kept == "old")
    assert abs(_ts(row) - manifest.created_at) < 1e-3  # the store holds the run of the folder in place
    assert _no_leftovers(root)
    again = aggregate.run(cfg, [refs])  # and the next publish goes through
    assert load_manifest(again["dir"])[0].created_at > manifest.created_at
