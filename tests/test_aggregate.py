"""The stage 7 Prefect task: artifacts on the flow run, a cache hit on an unchanged re-run, and a
re-run when the results folder was deleted (the cached result names files that are gone)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_report import NUMBERS, make_cfg, make_seed  # noqa: E402

prefect = pytest.importorskip("prefect")

from prefect import flow  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from tasks.aggregate import aggregate_task, artifact_key, publish_artifacts  # noqa: E402
from tasks.common import stage_options  # noqa: E402


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_artifact_keys_are_prefect_safe():
    assert (
        artifact_key("results", "tiny-tiny-neox-mlp_in-fair-seeds-42") == "results-tiny-tiny-neox-mlp-in-fair-seeds-42"
    )
    assert artifact_key("report", "Run 7/A") == "report-run-7-a"
    assert len(artifact_key("results", "x" * 300)) <= 100


def _setup(tmp_path):
    cfg = make_cfg(tmp_path, [42, 1337])
    seeds = [
        {stage: {**ref.to_json(), "worker": {"host": "test"}} for stage, ref in make_seed(cfg, s, NUMBERS[s]).items()}
        for s in (42, 1337)
    ]
    cfg_data = cfg.model_dump(mode="json")
    options = stage_options(cfg, "aggregate")

    @flow(name="aggregate-test")
    def run() -> tuple[dict, str]:  # (stage result, final state name of the task)
        cells = [{"label": "tiny-neox/mlp_in-abs", "seeds": seeds}]
        future = aggregate_task.with_options(**options).submit(cfg=cfg_data, seed=None, cells=cells)
        future.wait()
        result = future.result()
        result["artifacts"] = publish_artifacts(result)  # as the experiment flow does, on its own run
        return result, future.state.name

    return run


def test_task_publishes_artifacts(harness, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    result, state = _setup(tmp_path)()
    assert state == "Completed"
    assert Path(result["report"]).is_file() and result["files"] and all(Path(f).is_file() for f in result["files"])
    keys = result["artifacts"]
    assert keys == {"table": "results-synthetic-run", "report": "report-synthetic-run"}
    with get_client(sync_client=True) as client:
        table = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[keys["table"]])))
        md = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[keys["report"]])))
    assert table and table[0].type == "table" and "monotonic" in str(table[0].data)
    assert md and md[0].type == "markdown" and "## Findings" in md[0].data and "paired t-test" in md[0].data
    # the answer in one sentence (issue 24): the artifact's description, and the report's opening
    assert md[0].description == result["answer"] and f"**{result['answer']}**" in md[0].data
    # report.md names its config file next to it, not by this machine's absolute path
    text = Path(result["report"]).read_text()
    assert "full config: [`config.yaml`](config.yaml)" in text and str(Path(result["dir"]) / "config.yaml") not in text


def test_unchanged_rerun_is_a_cache_hit_until_the_folder_is_deleted(harness, tmp_path):
    run = _setup(tmp_path)
    result, state = run()
    assert state == "Completed"
    mtime = Path(result["dir"], "results.json").stat().st_mtime_ns
    again, state = run()
    assert state == "Cached" and again["digest"] == result["digest"]
    assert Path(result["dir"], "results.json").stat().st_mtime_ns == mtime
    # the results folder was deleted: the cached result is no longer valid, stage 7 runs again
    shutil.rmtree(result["dir"])
    third, state = run()
    assert state == "Completed" and Path(third["report"]).is_file() and third["digest"] == result["digest"]
    # another configuration's results took the folder (the same run name): not a hit either
    Path(third["dir"], "results.json").write_text("{}")
    fourth, state = run()
    assert state == "Completed" and fourth["digest"] == result["digest"]
