"""Stage 7 task: aggregate all seeds; and `publish_artifacts`, which the `experiment` flow calls on
its own run (the one a deployment run links to) to show the results table and the report (with
its figures embedded, `tasks.figures`) in the UI without opening any file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from monolm.study.registry import AGGREGATE
from tasks.common import artifact_key, config_of
from tasks.figures import embed_figures
from tasks.stage import as_ref, run_stage


def publish_artifacts(result: dict[str, Any]) -> dict[str, str]:
    """Create the table and markdown artifacts for an aggregate result (inside a flow or task
    run). Returns the artifact keys. Also usable by a flow that got the result from the cache."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    run_name = result["run_name"]
    keys = {"table": artifact_key("results", run_name), "report": artifact_key("report", run_name)}
    create_table_artifact(
        table=result["table"],
        key=keys["table"],
        description=f"{run_name}: per arm, mean over seeds (test perplexity; per attack the damage, the absolute "
        f"loss increase in nats/token, and the success rate in %). Report: {result['report']}",
    )
    report_md = embed_figures(Path(result["report"]).read_text(encoding="utf-8"), result["dir"])
    note = f"\n\n---\nResults folder: `{result['dir']}` (report.md, tables.tex, summary.csv, figures as PNG)\n"
    create_markdown_artifact(
        markdown=report_md + note,
        key=keys["report"],
        description=result.get("answer") or f"{run_name}: report.md with its figures",
    )
    return keys


@task(name="aggregate", task_run_name="aggregate")
def aggregate_task(cfg: dict, seed: int | None = None, cells: list[dict] | None = None) -> dict:
    """`cells`: per cell of the grid {"label", "seeds": one {stage name: stage task result} per
    seed}. Returns the stage result (with "dir" and "files", which the cache-validity check uses);
    the flow publishes it (`publish_artifacts`), so a cache hit shows the same artifacts."""
    per_cell = {
        cell["label"]: [{stage: as_ref(ref) for stage, ref in refs.items()} for refs in cell["seeds"]]
        for cell in cells or []
    }
    config = config_of(cfg)

    return run_stage(
        "aggregate", config, None, Path(config.paths.results_root), lambda c: AGGREGATE.function()(c, per_cell)
    )
