"""`monolm results --compare A B` (issue 24): the configuration difference first, then one row per
quantity of the headline metrics (`--metric`/`--arm` honoured, `--all` for everything), no
`:mean`/`:ci` duplicates, no differences of p-values; an unknown metric lists the known ones and
`--metric perplexity` means the run table's perplexity."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

RUN_A = "tiny-neox-mlp_in-fair-seeds-1-2-aaaa"
RUN_B = "tiny-neox-mlp_both-fair-seeds-1-2-bbbb"


def monolm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env
    )


def _rows(ppl: float, damage: float) -> list[dict]:
    rows = []
    for seed, bump in ((1, 0.0), (2, 2.0)):
        for arm, factor in (("baseline", 1.0), ("monotonic", 1.2)):
            rows += [
                {
                    "seed": seed,
                    "arm": arm,
                    "stage": "evaluate",
                    "metric": "token_perplexity",
                    "value": ppl * factor + bump,
                },
                {"seed": seed, "arm": arm, "stage": "uat", "metric": "abs_increase", "value": damage * factor},
                {"seed": seed, "arm": arm, "stage": "uat", "metric": "abs_increase_ci_low", "value": damage / 2},
                {"seed": seed, "arm": arm, "stage": "train_baseline", "metric": "wall_time_s", "value": 10.0 + bump},
            ]
    for arm in ("baseline", "monotonic"):
        rows.append({"arm": arm, "stage": "evaluate", "metric": "token_perplexity:mean", "value": ppl})
        rows.append({"arm": arm, "stage": "evaluate", "metric": "token_perplexity:ci_low", "value": ppl - 1})
    rows.append({"arm": "monotonic-baseline", "stage": "uat", "metric": "abs_increase:t_p", "value": 0.04})
    return rows


@pytest.fixture()
def store(tmp_path):
    from monolm.store import ResultsStore

    url = f"sqlite:///{tmp_path / 'results.sqlite'}"
    with ResultsStore(url) as s:
        for run_id, variant, ppl, damage in ((RUN_A, "mlp_in", 20.0, 0.5), (RUN_B, "mlp_both", 30.0, 0.25)):
            run = {"run_id": run_id, "run_name": run_id[:-5], "preset": "tiny", "variant": variant, "recipe": "fair"}
            s.record_run(
                {**run, "config_digest": run_id[-4:] * 4}, [{**r, "variant": variant} for r in _rows(ppl, damage)]
            )
            folder = tmp_path / "results" / run_id[:-5]
            folder.mkdir(parents=True)
            (folder / "config.yaml").write_text(
                f"run_name: {run_id[:-5]}\nconstraint:\n  variant: {variant}\ntraining:\n  common:\n    lr: "
                f"{'0.0005' if variant == 'mlp_in' else '0.001'}\npaths:\n  runs_root: {tmp_path}/{variant}\n"
            )
    return url


def test_compare_shows_the_config_difference_first_then_one_row_per_headline_quantity(store, tmp_path):
    out = monolm("results", "--store", store, "--compare", "tiny-neox-mlp_in", "tiny-neox-mlp_both", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"A = {RUN_A}" in text and f"B = {RUN_B}" in text  # full IDs
    config_at, metrics_at = text.index("Configuration"), text.index("headline metrics")
    assert config_at < metrics_at
    config_part = text[config_at:metrics_at]
    assert "variant" in config_part and "training.common.lr" in config_part and "0.001" in config_part
    assert "paths.runs_root" not in config_part and "run_name" not in config_part
    lines = [line for line in text[metrics_at:].splitlines() if "token_perplexity" in line or "abs_increase" in line]
    assert len(lines) == 4, text  # 2 arms x (perplexity, UAT damage), each once
    assert ":mean" not in text and ":ci" not in text and "_ci_low" not in text and "t_p" not in text
    assert "wall_time_s" not in text


def test_compare_honours_metric_arm_and_all(store, tmp_path):
    args = ("results", "--store", store, "--compare", RUN_A, RUN_B)
    one = monolm(*args, "--metric", "perplexity", "--arm", "monotonic", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    rows = [line for line in one.stdout.splitlines() if "token_perplexity" in line and "│" in line]
    assert len(rows) == 1 and "monotonic" in rows[0] and "abs_increase" not in one.stdout
    every = monolm(*args, "--all", cwd=tmp_path)
    assert every.returncode == 0 and "wall_time_s" in every.stdout and ":mean" not in every.stdout
    text = every.stdout
    assert text.index("token_perplexity") < text.index("wall_time_s")  # headline first, wall times last
    unknown = monolm(*args, "--metric", "perplxity", cwd=tmp_path)
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    assert "did you mean" in unknown.stderr and "Known: abs_increase" in unknown.stderr


def test_results_metric_takes_the_run_tables_name(store, tmp_path):
    out = monolm("results", "--store", store, "--metric", "perplexity", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "(no results)" not in out.stdout and "token_perplexity" in out.stdout
