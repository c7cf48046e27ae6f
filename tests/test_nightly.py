"""The nightly regression check (flows/nightly.py): which run it compares with, what counts as a
regression, the artifact it publishes and the failed run it makes; end to end through the
`experiment` flow with `nightly=True` on the micro config."""

from __future__ import annotations

import json

import pytest
from helpers import micro_sets

from flows.nightly import (
    DEFAULT_TOLERANCES,
    Tolerance,
    check_store,
    compare,
    key_metrics,
    nightly_run_name,
    parse_tolerances,
    set_status,
)
from monolm.store import ResultsStore

# The seven key metrics of one run as stage 7 records them (across-seed means, seed NULL).
GOOD = {
    ("evaluate", "base", "token_perplexity"): 140.0,
    ("evaluate", "baseline", "token_perplexity"): 120.0,
    ("evaluate", "monotonic", "token_perplexity"): 150.0,
    ("uat", "baseline", "abs_increase"): 0.30,
    ("uat", "monotonic", "abs_increase"): 0.20,
    ("hotflip", "baseline", "abs_increase"): 0.50,
    ("hotflip", "monotonic", "abs_increase"): 0.01,
}


def rows(values: dict, seeds=(42, 1337)) -> list[dict]:
    """Store rows like `monolm.report.stage.store_rows`: per-seed values, `:mean/:std/...`
    summaries, other metrics and comparisons that the check must ignore."""
    out = []
    for (stage, model, metric), value in values.items():
        for i, seed in enumerate(seeds):
            out.append({"seed": seed, "arm": model, "stage": stage, "metric": metric, "value": value * (1 + 0.5 * i)})
        out.append({"seed": None, "arm": model, "stage": stage, "metric": f"{metric}:mean", "value": value})
        out.append({"seed": None, "arm": model, "stage": stage, "metric": f"{metric}:std", "value": value / 10})
        out.append({"seed": None, "arm": model, "stage": stage, "metric": f"{metric}:ci_high", "value": value * 9})
    out.append({"seed": None, "arm": "baseline", "stage": "uat", "metric": "success_rate:mean", "value": 0.9})
    out.append(
        {
            "seed": None,
            "arm": "monotonic-baseline",
            "stage": "evaluate",
            "metric": "token_perplexity:diff",
            "value": 1e6,
        }
    )
    return out


def record(
    store: ResultsStore,
    run_id: str,
    values: dict,
    *,
    name: str | None = None,
    when: str,
    preset: str = "quick",
    status: str = "completed",
    model: str = "EleutherAI/pythia-1.4b",
) -> None:
    store.record_run(
        {
            "run_id": run_id,
            "run_name": name or run_id,
            "created_at": when,
            "preset": preset,
            "model": model,
            "variant": "mlp_in",
            "recipe": "fair",
            "seeds": [42, 1337],
            "status": status,
        },
        rows(values),
    )


@pytest.fixture
def store(tmp_path):
    with ResultsStore(f"sqlite:///{tmp_path / 'results.sqlite'}") as s:
        yield s


def test_key_metrics_picks_the_across_seed_means_only():
    assert key_metrics(rows(GOOD)) == GOOD


def test_passing_and_regressing_result_sets(store):
    record(store, "nightly-1", GOOD, when="2026-01-01T02:00:00Z")
    # Not candidates for "previous": another preset, another model, a non-nightly run, a partial run.
    record(store, "nightly-tiny", {k: v * 3 for k, v in GOOD.items()}, preset="tiny", when="2026-01-01T12:00:00Z")
    record(
        store, "nightly-other-model", {k: v * 3 for k, v in GOOD.items()}, model="other", when="2026-01-01T13:00:00Z"
    )
    record(store, "quick-manual", {k: v * 3 for k, v in GOOD.items()}, when="2026-01-01T14:00:00Z")
    record(store, "nightly-partial", {k: v * 3 for k, v in GOOD.items()}, status="partial", when="2026-01-01T15:00:00Z")

    # Night 2: every metric moved, but within tolerance (perplexity +4 %, attacks within 25 % / 0.02 nats).
    within = dict(GOOD)
    within[("evaluate", "monotonic", "token_perplexity")] = 150.0 * 1.04
    within[("uat", "baseline", "abs_increase")] = 0.30 * 0.8
    within[("hotflip", "monotonic", "abs_increase")] = 0.025  # +0.015 nats: under the 0.02 floor
    record(store, "nightly-2", within, when="2026-01-02T02:00:00Z")
    passing = check_store(store, "nightly-2")
    assert passing.previous["run_id"] == "nightly-1"
    assert passing.passed and len(passing.findings) == 7
    assert {f.status for f in passing.findings} == {"ok"}
    assert passing.message().startswith("no regression")
    assert "**No regression**" in passing.markdown() and "`nightly-1`" in passing.markdown()

    # Night 3: the monotonic arm's perplexity +10 %, UAT on the baseline much weaker (an attack
    # that got worse is a regression too), HotFlip on the monotonic arm not measured at all.
    bad = dict(within)
    bad[("evaluate", "monotonic", "token_perplexity")] = within[("evaluate", "monotonic", "token_perplexity")] * 1.10
    bad[("uat", "baseline", "abs_increase")] = 0.05
    del bad[("hotflip", "monotonic", "abs_increase")]
    record(store, "nightly-3", bad, when="2026-01-03T02:00:00Z")
    failing = check_store(store, "nightly-3")
    assert failing.previous["run_id"] == "nightly-2"
    assert not failing.passed
    regressed = {(f.stage, f.model, f.metric): f.status for f in failing.regressions}
    assert regressed == {
        ("evaluate", "monotonic", "token_perplexity"): "beyond tolerance",
        ("uat", "baseline", "abs_increase"): "beyond tolerance",
        ("hotflip", "monotonic", "abs_increase"): "missing now",
    }
    message = failing.message()
    assert message.startswith("regression: 3 of 7 key metrics of nightly-3 moved beyond tolerance since nightly-2")
    assert "evaluate token_perplexity (monotonic): 156 -> 171.6 (change +15.6, +10.0%; tolerance ±7.8)" in message
    assert "uat abs_increase (baseline): 0.24 -> 0.05" in message
    assert "hotflip abs_increase (monotonic): 0.025 before, not measured now" in message
    md = failing.markdown()
    assert "**Regression**: 3 of 7" in md and md.count("| beyond tolerance |") == 2 and "| missing now |" in md

    # The first nightly run has nothing to compare with: it passes and says so.
    first = check_store(store, "nightly-1")
    assert first.previous is None and first.passed and "first nightly run" in first.message()


def test_a_regressed_run_never_becomes_the_baseline(store):
    record(store, "nightly-1", GOOD, when="2026-01-01T02:00:00Z")
    worse = {k: v * 2 for k, v in GOOD.items()}
    record(store, "nightly-2", worse, when="2026-01-02T02:00:00Z")
    assert not check_store(store, "nightly-2").passed
    set_status(store, "nightly-2", "failed")  # what the task does on a regression
    assert store.get_run("nightly-2")["status"] == "failed"
    assert key_metrics(store.query(run_id="nightly-2")) == worse  # metrics kept
    # The regression persists the next night: still compared with the last good run, still fails.
    record(store, "nightly-3", worse, when="2026-01-03T02:00:00Z")
    again = check_store(store, "nightly-3")
    assert again.previous["run_id"] == "nightly-1" and not again.passed


def test_non_finite_and_new_metrics():
    prev = {("evaluate", "baseline", "token_perplexity"): 100.0}
    now = {("evaluate", "baseline", "token_perplexity"): None, ("uat", "baseline", "abs_increase"): 0.3}
    findings = {f.metric: f for f in compare(now, prev)}
    assert findings["token_perplexity"].status == "not finite" and findings["token_perplexity"].regression
    assert findings["abs_increase"].status == "new" and not findings["abs_increase"].regression


def test_tolerances():
    assert parse_tolerances(None) == DEFAULT_TOLERANCES
    tol = parse_tolerances({"token_perplexity": 0.1, "abs_increase": {"abs": 0.05}})
    assert tol["token_perplexity"] == Tolerance(rel=0.1, abs=0.0)
    assert tol["abs_increase"] == Tolerance(rel=0.25, abs=0.05)
    assert Tolerance(rel=0.25, abs=0.02).allowed(0.01) == 0.02 and Tolerance(rel=0.25, abs=0.02).allowed(-4.0) == 1.0
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        parse_tolerances({"bleu": 0.1})
    with pytest.raises(ValueError, match=">= 0"):
        parse_tolerances({"abs_increase": -0.1})


def test_nightly_run_names_sort_by_time():
    import datetime as dt

    a = nightly_run_name("quick", dt.datetime(2026, 1, 2, 2, 0, tzinfo=dt.timezone(dt.timedelta(hours=1))))
    assert a == "nightly-quick-20260102T010000Z"
    assert nightly_run_name("quick", dt.datetime(2026, 1, 2, 1, 0, 1)) > a


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_backend")
def test_nightly_experiment_flow_end_to_end(tmp_path):
    """The experiment flow with nightly=True on the micro config: the first run passes with
    nothing to compare, the second (same code and config, so the same numbers) passes against
    the first; after a better previous nightly run appears in the store, the next run fails with a
    regression message, publishes it as an artifact and is marked failed in the store."""
    from prefect.client.orchestration import get_client

    from flows.experiment import experiment

    sets = micro_sets(tmp_path)
    first = experiment(preset="tiny", seeds=[42], overrides=sets, nightly=True)
    assert first["run_name"].startswith("nightly-tiny-")
    assert first["regression"]["passed"] and first["regression"]["previous_run_id"] is None

    second = experiment(preset="tiny", seeds=[42], overrides=sets, nightly=True)
    assert second["run_name"] != first["run_name"]
    check = second["regression"]
    assert check["passed"] and check["previous_run_id"] == first["run_id"]
    # Every key metric the real stage 7 records was compared: 4 perplexities (base, both arms and
    # the damage-matched arm), 3 attacks x 3 attacked models.
    assert sorted((f["stage"], f["model"]) for f in check["findings"]) == [
        ("evaluate", "base"),
        ("evaluate", "baseline"),
        ("evaluate", "damage"),
        ("evaluate", "monotonic"),
        ("gcg", "baseline"),
        ("gcg", "damage"),
        ("gcg", "monotonic"),
        ("hotflip", "baseline"),
        ("hotflip", "damage"),
        ("hotflip", "monotonic"),
        ("uat", "baseline"),
        ("uat", "damage"),
        ("uat", "monotonic"),
    ]
    assert {f["status"] for f in check["findings"]} == {"ok"}

    # A previous nightly run whose monotonic perplexity was 20 % lower than what the code gives now.
    store_url = f"sqlite:///{tmp_path / 'runs' / 'results.sqlite'}"
    with ResultsStore(store_url) as store:
        better = [
            {k: r[k] for k in ("seed", "arm", "stage", "metric", "value", "extra")}
            for r in store.query(run_id=second["run_id"])
        ]
        for row in better:
            if row["arm"] == "monotonic" and row["metric"] == "token_perplexity:mean":
                row["value"] *= 0.8
        run = store.get_run(second["run_id"])
        store.record_run(
            {**run, "run_id": "nightly-tiny-better", "run_name": "nightly-tiny-better", "created_at": None}, better
        )

    state = experiment(preset="tiny", seeds=[42], overrides=sets, nightly=True, return_state=True)
    assert state.is_failed()
    assert "regression: 1 of 13 key metrics" in state.message and "token_perplexity (monotonic)" in state.message
    with ResultsStore(store_url) as store:
        regressed = [r for r in store.runs("tiny", run_name_prefix="nightly-tiny-2") if r["status"] == "failed"]
        assert len(regressed) == 1  # the third run, kept with its numbers but never a baseline

    async def artifact():
        async with get_client() as client:
            return await client.read_latest_artifacts()

    import asyncio

    latest = {a.key: a for a in asyncio.run(artifact())}
    md = latest["nightly-regression-tiny"].data
    assert "**Regression**: 1 of 13" in md and "`nightly-tiny-better`" in md
    assert json.dumps(md)  # plain markdown text
