"""What a user watching a run sees (issue 15): every library log line once on the console and once
in its task run's logs, training and attack progress as log lines and progress artifacts, the
training curve as a table while training runs, and stage 7's figures inside the report artifact.

The flow run is `monolm run` in a subprocess, as a user types it, reporting to the session's
Prefect test server, whose API the test then reads."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from helpers import micro_sets

from monolm.core.progress import Progress, eta_seconds, format_eta, labelled, part_callback

REPO = Path(__file__).resolve().parents[1]
PROGRESS_STAGES = (
    "train-baseline",
    "train-monotonic",
    "evaluate-baseline",
    "evaluate",
    "uat-baseline",
    "uat",
    "hotflip-baseline",
    "hotflip",
    "gcg-baseline",
    "gcg",
    "damage",
    "ladder",
)


# ----------------------------------------------------------------------------- the library, no Prefect
def test_eta_formats_and_rates():
    seconds = (None, float("nan"), 0, 42.4, 185, 3720)
    assert [format_eta(s) for s in seconds] == ["?", "?", "0s", "42s", "3m05s", "1h02m"]
    assert eta_seconds(0, 10, 5.0) is None
    assert eta_seconds(5, 10, 5.0) == pytest.approx(5.0)
    # Units reused from disk do not count as speed: 2 of 5 done units were worked in 6 s.
    assert eta_seconds(5, 10, 6.0, done_at_start=3) == pytest.approx(15.0)
    assert eta_seconds(10, 10, 1.0, done_at_start=10) == 0.0


def test_progress_lines_and_events(caplog):
    events: list[dict] = []
    tracker = Progress(4, log=labelled(logging.getLogger("monolm.test"), "baseline"), on_log=events.append, what="x")
    with caplog.at_level(logging.INFO, logger="monolm.test"):
        tracker.update(1, "x unit 1/4: loss 1.0", reused=True)
        tracker.update(2, "x unit 2/4: loss 2.0", loss_increase=0.5)
    assert [r.getMessage().split(", ETA")[0] for r in caplog.records] == [
        "baseline: x unit 1/4: loss 1.0",
        "baseline: x unit 2/4: loss 2.0",
    ]
    assert [(e["kind"], e["done"], e["total"], e["fraction"]) for e in events] == [
        ("progress", 1, 4, 0.25),
        ("progress", 2, 4, 0.5),
    ]
    assert events[0]["eta_s"] is None and events[1]["eta_s"] is not None and events[1]["loss_increase"] == 0.5
    # A stage made of two parts: the second part's half is three quarters of the stage.
    stage_events: list[dict] = []
    second = part_callback(stage_events.append, 1, 2, "monotonic")
    second({"kind": "progress", "fraction": 0.5, "message": "m"})
    assert stage_events == [{"kind": "progress", "fraction": 0.75, "message": "m", "part": "monotonic"}]
    assert part_callback(None, 0, 2, "baseline") is None


def test_console_handler_writes_once_and_routes_a_threads_records(capsys):
    """The `monolm` logger writes each record once (no propagation to the root logger's
    handlers); a routed thread's records go to its sink only."""
    from monolm.core.logs import route_thread, setup_logging

    root_lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            root_lines.append(record.getMessage())

    from monolm.core.logs import ConsoleHandler

    root = logging.getLogger()
    lib = logging.getLogger("monolm")
    saved = (lib.level, lib.propagate, list(lib.handlers))
    collect = Collect()
    root.addHandler(collect)
    log = logging.getLogger("monolm.test")
    try:
        # As in a process that never set logging up, whatever an earlier in-process CLI call did.
        lib.handlers[:] = [h for h in saved[2] if not isinstance(h, ConsoleHandler)]
        lib.propagate = True
        never_set_up = list(lib.handlers)
        lib.setLevel(logging.INFO)
        # A process that never set logging up (a worker): records propagate, except while routed.
        routed: list[str] = []
        with route_thread(lambda record: routed.append(record.getMessage())):
            log.info("routed line")
            assert not lib.propagate
        log.info("propagated line")
        assert lib.propagate and lib.handlers == never_set_up
        # The CLI: one console handler, no propagation.
        setup_logging(logging.INFO)
        log.info("plain line")
        with route_thread(lambda record: routed.append(record.getMessage())):
            log.info("routed again")
        log.info("after")
    finally:
        root.removeHandler(collect)
        lib.handlers[:] = saved[2]
        lib.setLevel(saved[0])
        lib.propagate = saved[1]
    err = capsys.readouterr().err
    assert err.count("plain line") == 1 and err.count("after") == 1 and "routed" not in err
    assert routed == ["routed line", "routed again"]
    assert root_lines == ["propagated line"]


def test_stage_progress_artifact_updates_are_throttled(monkeypatch):
    """At most one update per interval, but always the first, every evaluation and the end."""
    import prefect.artifacts as artifacts

    from tasks import progress
    from tasks.progress import StageProgress

    sent: list[float] = []
    tables: list[dict] = []
    monkeypatch.setattr(artifacts, "create_progress_artifact", lambda progress, key=None, description=None: "id")
    monkeypatch.setattr(
        artifacts, "update_progress_artifact", lambda artifact_id, progress, description=None: sent.append(progress)
    )
    monkeypatch.setattr(artifacts, "create_table_artifact", lambda **kw: tables.append(kw) or "table-id")
    monkeypatch.setattr(progress, "update_table_artifact", lambda artifact_id, rows: tables.append({"table": rows}))
    now = [0.0]
    tracker = StageProgress("train_baseline", 42, "run", min_interval_s=5.0, clock=lambda: now[0])
    for step in range(1, 201):  # 200 steps, 0.1 s each: 20 s
        now[0] = step * 0.1
        tracker({"kind": "train", "step": step, "fraction": step / 200, "train_loss": 2.0, "message": f"step {step}"})
        if step in (50, 100):
            tracker({"kind": "eval", "step": step, "fraction": step / 200, "val_perplexity": 9.0, "val_loss": 2.2})
    tracker.finish()
    # The first step; the evaluations (forced); every 5 s after the last update; the last step; the end.
    assert sent == [0.5, 25.0, 50.0, 50.0, 75.0, 100.0, 100.0], sent
    # The curve: created at the first evaluation, its rows replaced at the next.
    assert [len(t["table"]) for t in tables] == [1, 2] and tables[0]["key"] == "curve-run-seed-42-train-baseline"
    assert "val perplexity 9.000 at step 100" in tracker._description()
    assert tracker._description().startswith("**train_baseline seed 42**: 100%\n")


def test_training_curve_starts_at_step_0_with_readable_precision(monkeypatch):
    """The curve artifact's first row is the starting model (step 0, no training loss yet); losses
    to 4 decimals, perplexity to 2, the learning rate to 3 significant digits, whole tokens/s."""
    import prefect.artifacts as artifacts

    from tasks import progress
    from tasks.progress import StageProgress

    tables: list[list[dict]] = []
    monkeypatch.setattr(artifacts, "create_progress_artifact", lambda progress, key=None, description=None: "id")
    monkeypatch.setattr(artifacts, "update_progress_artifact", lambda artifact_id, progress, description=None: None)
    monkeypatch.setattr(artifacts, "create_table_artifact", lambda **kw: tables.append(kw["table"]) or "table-id")
    monkeypatch.setattr(progress, "update_table_artifact", lambda artifact_id, rows: tables.append(rows))
    tracker = StageProgress("train_baseline", 42, "run")
    tracker({"kind": "eval", "step": 0, "fraction": 0.0, "val_perplexity": 41.123456, "val_loss": 3.716789123})
    train = {"kind": "train", "step": 2, "train_loss": 3.5123456, "lr": 0.000312345, "tokens_per_s": 1234.56789}
    tracker({**train, "fraction": 0.5})
    tracker({"kind": "eval", "step": 2, "fraction": 0.5, "val_perplexity": 30.987654, "val_loss": 3.4335678})
    start, after = tables[-1]
    assert start == {
        "step": 0,
        "train_loss": None,
        "val_loss": 3.7168,
        "val_perplexity": 41.12,
        "lr": None,
        "tokens_per_s": None,
    }
    assert after == {
        "step": 2,
        "train_loss": 3.5123,
        "val_loss": 3.4336,
        "val_perplexity": 30.99,
        "lr": 0.000312,
        "tokens_per_s": 1235,
    }


# ----------------------------------------------------------------------------- a flow run
def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def watched_run(tmp_path_factory, prefect_backend):
    """`monolm run` (micro config) reporting to the test server: its console output and run name."""
    tmp = tmp_path_factory.mktemp("watched")
    name = f"watched-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_API_URL=_api_url(), PREFECT_HOME=str(tmp / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    args = [sys.executable, "-m", "flows.cli", "run", "--preset", "tiny", "--seeds", "42", "--run-name", name]
    for s in micro_sets(tmp):
        args += ["--set", s]
    proc = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"name": name, "output": proc.stdout + proc.stderr, "dir": tmp}


def _sync_client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _stage_flow_run(name: str):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with _sync_client() as client:
        (run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[f"{name}-stages"])))
        return run


def _task_logs(flow_run_id) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    out, offset = [], 0
    with _sync_client() as client:
        while True:
            page = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                limit=200,
                offset=offset,
                sort=LogSort.TIMESTAMP_ASC,
            )
            out += [log.message for log in page if log.task_run_id is not None]
            offset += len(page)
            if len(page) < 200:
                return out


def _artifacts(flow_run_id) -> list:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with _sync_client() as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )


@pytest.mark.slow
def test_each_library_log_line_appears_once_on_the_console_and_once_in_the_task_run(watched_run):
    output = watched_run["output"]
    line = "monolm.stages: stage constrain (seed 42) finished in"
    assert output.count(line) == 1, [s for s in output.splitlines() if "stage constrain" in s]
    # Every training and attack progress line once, too (the micro config trains 4 steps).
    assert output.count("train step 4/4: loss") == 1
    assert output.count("train (constrained) step 4/4: loss") == 1
    assert output.count("baseline: hotflip block 2/2") == 1
    runs = _stage_flow_run(watched_run["name"])
    logs = _task_logs(runs.id)
    assert sum(line in m for m in logs) == 1, [m for m in logs if "constrain" in m]


@pytest.mark.slow
def test_training_and_attack_progress_in_the_task_run_logs(watched_run):
    logs = _task_logs(_stage_flow_run(watched_run["name"]).id)
    steps = [m for m in logs if re.search(r"train step \d+/4: loss [\d.]+, lr \S+, [\d,]+ tokens/s, ETA \S+$", m)]
    assert len(steps) == 4, logs  # log_every_steps=1
    assert [m for m in logs if re.search(r"train \(constrained\) eval at step 4/4: val perplexity [\d.]+", m)]
    assert [m for m in logs if re.search(r"monotonic: uat restart 1/1 sweep 1/1: batch loss [\d.]+ \([+-][\d.]+ ", m)]
    assert [m for m in logs if re.search(r"baseline: hotflip block 1/2: mean loss increase [+-][\d.]+ .*ETA", m)]
    assert [m for m in logs if re.search(r"evaluate baseline \(2/2\): perplexity [\d.]+", m)]  # with the base model
    assert [m for m in logs if re.search(r"evaluate monotonic \(1/1\): perplexity [\d.]+", m)]  # the cell's own


def _parent_flow_run(sub):
    """The `experiment` run that started sub-flow run `sub` (the run a deployment run links to)."""
    with _sync_client() as client:
        return client.read_flow_run(client.read_task_run(sub.parent_task_run_id).flow_run_id)


@pytest.mark.slow
def test_progress_artifacts_curves_and_embedded_figures(watched_run):
    run = _stage_flow_run(watched_run["name"])
    artifacts = _artifacts(run.id)
    progress = [a for a in artifacts if a.type == "progress"]
    with _sync_client() as client:
        task_names = {t.id: t.name for t in client.read_task_runs()}
    by_stage = {re.sub(r"-seed-\d+$", "", task_names.get(a.task_run_id, "?")): a for a in progress}
    assert set(by_stage) == set(PROGRESS_STAGES), by_stage
    for stage, artifact in by_stage.items():
        assert float(artifact.data) == 100.0, (stage, artifact.data)
        assert artifact.description.startswith(f"**{stage.replace('-', '_')} seed 42**: 100%\n"), artifact.description
    # The training curve: one table per arm, updated in place at each evaluation: one row per
    # evaluation (the starting model at step 0, then steps 2 and 4), with the training loss.
    curves = {a.key: a for a in sorted(artifacts, key=lambda a: a.created) if a.key and a.key.startswith("curve-")}
    assert set(curves) == {f"curve-{watched_run['name']}-seed-42-train-{arm}" for arm in ("baseline", "monotonic")}
    import json

    for curve in curves.values():
        rows = json.loads(curve.data)
        assert [r["step"] for r in rows] == [0, 2, 4]
        assert rows[0]["train_loss"] is None and rows[0]["val_perplexity"]
        assert all(r["train_loss"] and r["val_perplexity"] for r in rows[1:])
        assert all(isinstance(r["tokens_per_s"], int) for r in rows[1:]), rows
    # The report (with its three figures as small embedded PNGs) and the results table are on the
    # parent `experiment` run, whose state message says where the report is; not on the sub-flow.
    assert not [a for a in artifacts if a.key and a.key.startswith("report-")]
    parent = _parent_flow_run(run)
    assert parent.state_name == "Completed" and f"{watched_run['name']}: " in parent.state.message
    assert f"Report: artifact `report-{watched_run['name']}`" in parent.state.message, parent.state.message
    on_parent = _artifacts(parent.id)
    assert {a.key for a in on_parent} >= {f"report-{watched_run['name']}", f"results-{watched_run['name']}"}
    (report,) = [a for a in on_parent if a.key and a.key.startswith("report-")]
    images = re.findall(r"!\[[^\]]+\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", report.data)
    assert len(images) == 3
    assert all(len(i) < 80_000 for i in images) and len(report.data) < 200_000
    assert "## Findings" in report.data and "](perplexity.png)" not in report.data


@pytest.mark.slow
def test_no_prefect_console_has_no_duplicated_lines(tmp_path):
    """`monolm run --no-prefect`: the library's lines once each (bars, on a terminal, are redrawn
    below them by tqdm.write)."""
    args = [sys.executable, "-m", "flows.cli", "run", "--preset", "tiny", "--seeds", "42", "--no-prefect"]
    for s in micro_sets(tmp_path):
        args += ["--set", s]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [re.sub(r"^\d\d:\d\d:\d\d ", "", s) for s in proc.stderr.splitlines() if "monolm." in s]
    assert lines and len(lines) == len(set(lines)), lines
    assert sum("train step 4/4" in s for s in lines) == 1


def test_dask_logs_default_to_warnings_and_follow_dasks_own_setting(monkeypatch):
    from infra.profiles import DASK_LOG_LEVEL, quiet_dask_logs

    dask_log = logging.getLogger("distributed")
    monkeypatch.setattr(dask_log, "level", dask_log.level)  # restored after the test
    monkeypatch.delenv(DASK_LOG_LEVEL, raising=False)
    assert quiet_dask_logs(workers_too=False) == "warning" and dask_log.level == logging.WARNING
    assert DASK_LOG_LEVEL not in os.environ  # SLURM jobs' log files keep dask's default
    assert quiet_dask_logs(workers_too=True) == "warning"
    assert os.environ[DASK_LOG_LEVEL] == "warning"  # inherited by the LocalCluster's worker processes
    monkeypatch.setenv(DASK_LOG_LEVEL, "info")  # the user asked for dask's INFO lines: kept
    assert quiet_dask_logs(workers_too=True) == "info" and dask_log.level == logging.INFO
    monkeypatch.setenv(DASK_LOG_LEVEL, "loud")
    with pytest.raises(ValueError, match="DASK_LOGGING__DISTRIBUTED='loud' is not a logging level"):
        quiet_dask_logs(workers_too=False)


@pytest.mark.slow
def test_dask_local_run_shows_each_event_once_and_no_dask_chatter(tmp_path, prefect_backend):
    """The `dask-local` profile (stages in worker processes): the run completes, each library line
    reaches the console once, and dask's own INFO lines (nannies, workers, clients) and its
    shutdown traceback stay off the console."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DASK_"))}
    env.update(PREFECT_API_URL=_api_url(), PREFECT_HOME=str(tmp_path / "prefect"))
    args = [sys.executable, "-m", "flows.cli", "run", "--preset", "tiny", "--seeds", "42", "--profile", "dask-local"]
    for s in micro_sets(tmp_path, "runner.dask_workers=2"):
        args += ["--set", s]
    proc = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert output.count("monolm.stages: stage constrain (seed 42) finished in") == 1
    assert output.count("train step 4/4: loss") == 1
    assert "Traceback" not in output
    assert not [s for s in output.splitlines() if "| INFO    | distributed." in s]
    assert (tmp_path / "results").is_dir()
