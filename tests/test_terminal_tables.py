"""Terminal tables (issue 24): as wide as the terminal, IDs never split across lines, readable
labels with units, the arm column called `arm`, rates in %."""

from __future__ import annotations

import pytest

from monolm.store import format_table

RUN_ID = "quick-EleutherAI--pythia-1.4b-mlp_in-fair-seeds-42-1337-2024-20260102T030405-abcdef12"


@pytest.mark.parametrize("width", [80, 100, 168])
def test_tables_fit_the_terminal_and_never_split_an_id(width, monkeypatch):
    monkeypatch.setenv("COLUMNS", str(width))
    rows = [
        {
            "run_id": RUN_ID,
            "created": "2026-01-02 03:04",
            "status": "completed",
            "arm": arm,
            "stage": "evaluate",
            "metric": "token_perplexity",
            "mean": 21.123456,
            "n_seeds": 3,
        }
        for arm in ("baseline", "monotonic")
    ]
    text = format_table(rows)
    lines = text.splitlines()
    # an ID longer than the terminal is on a line of its own (`run_id: <ID>`), whole
    assert max(len(line) for line in lines) <= max(width, len("run_id: " + RUN_ID)), text
    assert sum(RUN_ID in line for line in lines) in (1, 2), text  # whole: in each row, or once above them
    assert not any(line.rstrip(" │┃").endswith(RUN_ID[:40]) for line in lines), text  # never cut


def test_run_table_labels_arm_units_and_percent(capsys, monkeypatch):
    from monolm.report.console import print_rows
    from monolm.study.frame import StageRef
    from monolm.study.sequential import summary_rows

    monkeypatch.setenv("COLUMNS", "200")
    refs = {
        "evaluate": StageRef(
            "evaluate", 1, "/x", "d", {"baseline_token_perplexity": 20.0, "monotonic_token_perplexity": 26.0}
        ),
        "uat": StageRef(
            "uat",
            1,
            "/x",
            "d",
            {
                "per_model": {
                    "baseline": {"abs_increase": 0.5, "success_rate": 0.25},
                    "monotonic": {"abs_increase": 0.4, "success_rate": 0.5},
                }
            },
        ),
    }
    rows = summary_rows(refs)
    assert [r["arm"] for r in rows] == ["base", "baseline", "monotonic"]
    assert rows[2]["UAT success (%)"] == 50 and rows[2]["UAT damage (nats/token)"] == 0.4
    print_rows("seed 1", rows)
    out = capsys.readouterr().out
    assert "arm" in out and "UAT damage (nats/token)" in out and "_" not in out


def test_narrow_group_heading_never_cuts_a_name_value_pair():
    """Grouped (too narrow for one line per row): the one-valued columns go above each group as
    `name: value` pairs, each whole on one line (a header with a space, a value with hyphens)."""
    rows = [
        {
            "flow run": name,
            "deployment": "experiment/seed-42",
            "state": "Scheduled",
            "started / due": "2027-12-06 19:45",
            "preset": "tiny",
            "seeds": "42 1337",
        }
        for name in ("crimson-tortoise", "able-fox")
    ]
    lines = format_table(rows, width=40).splitlines()
    assert all(len(line) <= 40 for line in lines), lines
    for pair in ("deployment: experiment/seed-42", "state: Scheduled", "started / due: 2027-12-06 19:45"):
        assert sum(pair in line for line in lines) == 2, (pair, lines)
