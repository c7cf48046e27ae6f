"""The results store: all-or-nothing runs, idempotent re-recording, versioned schema, queries
used by `monolm results` and the nightly regression check."""

from __future__ import annotations

import datetime as dt
import os
import threading
from collections.abc import Callable

import pytest
from sqlalchemy import (
    JSON,
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    insert,
    inspect,
    make_url,
    text,
    update,
)

from monolm import store as store_mod
from monolm.config import load_config
from monolm.store import ResultsStore, SchemaVersionError, UnknownRun, format_table, schema_version_table
from monolm.store import schema as store_schema


def _store_url(runs_root) -> str:
    """The store URL a config with this runs_root names by default (the default lives in the config)."""
    return load_config("tiny", sets=[f"paths.runs_root={runs_root}"]).store_url


@pytest.fixture
def store(tmp_path):
    s = ResultsStore(_store_url(tmp_path / "runs"))
    yield s
    s.close()


def _run(run_id: str, **kw) -> dict:
    base = {
        "run_id": run_id,
        "run_name": run_id,
        "preset": "tiny",
        "model": "tiny-neox",
        "variant": "mlp_in",
        "recipe": "fair",
        "config_digest": "abc123",
        "code_revision": "deadbeef",
        "seeds": [42, 1337],
        "status": "completed",
        "created_at": "2026-01-01T00:00:00+00:00",
    }
    return base | kw


def _metrics(values: dict[tuple[str, str, int], float], stage: str = "evaluate") -> list[dict]:
    return [
        {"seed": seed, "arm": arm, "stage": stage, "metric": metric, "value": value}
        for (arm, metric, seed), value in values.items()
    ]


def _count(store: ResultsStore, table: str) -> int:
    with store.engine.connect() as conn:
        return conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one()


# --------------------------------------------------------------------------- round trip
def test_record_and_query_round_trip(store, tmp_path):
    assert (tmp_path / "runs" / "results.sqlite").is_file()
    assert store.schema_version() == store_mod.SCHEMA_VERSION
    n = store.record_run(
        _run("r1", created_at=dt.datetime(2026, 3, 1, 14, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))),
        [
            {"seed": 42, "arm": "baseline", "stage": "evaluate", "metric": "loss", "value": 3.25},
            {
                "seed": 42,
                "arm": "monotonic",
                "stage": "evaluate",
                "metric": "loss",
                "value": 3.5,
                "extra": {"tokens": 1234, "note": "ünïcode"},
            },
            {
                "seed": 0,
                "arm": "monotonic",
                "stage": "uat",
                "metric": "loss_increase",
                "value": 0.7,
                "variant": "mlp_both",
            },
            {"seed": None, "arm": "monotonic", "stage": "aggregate", "metric": "t_p", "value": None},
        ],
    )
    assert n == 4
    rows = store.query(metric="loss")
    assert [(r["arm"], r["value"]) for r in rows] == [("baseline", 3.25), ("monotonic", 3.5)]
    row = rows[1]
    assert row["extra"] == {"tokens": 1234, "note": "ünïcode"}
    assert (row["preset"], row["variant"], row["recipe"]) == ("tiny", "mlp_in", "fair")  # inherited
    assert row["created_at"] == "2026-03-01T12:00:00+00:00"  # stored as UTC
    assert row["run_name"] == "r1" and row["code_revision"] == "deadbeef"
    assert [r["metric"] for r in store.query(arm="monotonic")] == ["t_p", "loss", "loss_increase"]
    assert store.query(variant="mlp_both")[0]["seed"] == 0
    assert len(store.query(preset="tiny", variant="mlp_in", arm="monotonic")) == 2
    assert store.query(preset="full") == []
    assert store.query(seed=0)[0]["metric"] == "loss_increase"
    run = store.get_run("r1")
    assert run["seeds"] == [42, 1337] and run["status"] == "completed" and run["config_digest"] == "abc123"
    assert store.get_run("nope") is None


def test_store_persists_across_instances_and_from_config(tmp_path):
    cfg = load_config("tiny", sets=[f"paths.runs_root={tmp_path / 'rr'}"])
    with ResultsStore.from_config(cfg) as first:
        first.record_run(_run("r1"), _metrics({("baseline", "loss", 42): 2.0}))
    assert (tmp_path / "rr" / "results.sqlite").is_file()
    with ResultsStore(cfg.store_url) as second:
        assert [r["value"] for r in second.query()] == [2.0]


def test_nonfinite_values_are_kept_visible_not_lost(store):
    store.record_run(
        _run("r1"),
        [
            {"metric": "loss", "value": float("nan"), "arm": "monotonic"},
            {"metric": "grad_norm", "value": float("inf"), "arm": "monotonic"},
        ],
    )
    rows = {r["metric"]: r for r in store.query()}
    assert rows["loss"]["value"] is None and rows["loss"]["extra"] == {"nonfinite": "nan"}
    assert rows["grad_norm"]["extra"] == {"nonfinite": "inf"}


@pytest.mark.parametrize(
    "run, metrics, match",
    [
        (_run("r1", colour="red"), [], "unknown run field"),
        (_run(""), [], "run_id"),
        (_run("r1", status="done"), [], "status='done'"),
        (_run("r1"), [{"metric": "loss", "value": 1.0, "colour": "x"}], r"metrics\[0\] has unknown field"),
        (_run("r1"), [{"metric": "loss", "value": 1.0, "model": "monotonic"}], r"model='monotonic', an arm: the arm's"),
        (_run("r1"), [{"metric": "loss"}], "no 'value'"),
        (_run("r1"), [{"value": 1.0}], "metric"),
        (_run("r1"), [{"metric": "loss", "value": "high"}], "not a number"),
        (_run("r1"), [{"metric": "loss", "value": 1.0, "extra": {"obj": object()}}], "JSON"),
    ],
)
def test_invalid_input_is_refused_by_name(store, run, metrics, match):
    with pytest.raises(ValueError, match=match):
        store.record_run(run, metrics)
    assert _count(store, "runs") == _count(store, "metrics") == 0


# --------------------------------------------------------------------------- transactions
def test_failure_midway_leaves_no_partial_rows(store):
    store.record_run(_run("r1", run_name="old"), _metrics({("baseline", "loss", s): 3.0 for s in range(3)}))
    inserted: list[str] = []
    event.listen(
        store.engine,
        "after_cursor_execute",
        lambda conn, cur, stmt, *a: inserted.append(stmt) if stmt.startswith("INSERT INTO metrics") else None,
    )
    many = _metrics({("monotonic", "loss", s): float(s) for s in range(1200)})
    many[700]["value"] = "corrupt"
    with pytest.raises(ValueError, match=r"metrics\[700\]"):
        store.record_run(_run("r1", run_name="new"), many)
    assert inserted, "the first chunk of rows must have been written before the failure"
    # the old version of r1 is intact: the delete and the partial inserts were rolled back
    assert store.get_run("r1")["run_name"] == "old"
    assert [r["value"] for r in store.query(run_id="r1")] == [3.0, 3.0, 3.0]
    assert _count(store, "metrics") == 3

    with pytest.raises(ValueError):
        store.record_run(_run("r2"), many)
    assert store.get_run("r2") is None and _count(store, "runs") == 1


def test_failure_from_generator_midway(store):
    def rows():
        yield from _metrics({("baseline", "loss", s): 1.0 for s in range(600)})
        raise RuntimeError("stage output unreadable")

    with pytest.raises(RuntimeError, match="unreadable"):
        store.record_run(_run("r9"), rows())
    assert _count(store, "runs") == _count(store, "metrics") == 0


def test_recording_same_run_replaces_it(store):
    store.record_run(
        _run("r1", status="running"), _metrics({("baseline", "loss", 42): 3.0, ("baseline", "acc", 42): 0.1})
    )
    store.record_run(_run("r1"), _metrics({("baseline", "loss", 42): 2.5}))
    store.record_run(_run("r1"), _metrics({("baseline", "loss", 42): 2.5}))
    assert _count(store, "runs") == 1
    assert [(r["metric"], r["value"]) for r in store.query()] == [("loss", 2.5)]
    assert store.get_run("r1")["status"] == "completed"
    assert store.delete_run("r1") and not store.delete_run("r1")
    assert _count(store, "metrics") == 0


def test_concurrent_writers_on_one_sqlite_file(tmp_path):
    url = _store_url(tmp_path)
    ResultsStore(url).close()
    errors: list[BaseException] = []

    def writer(worker: int) -> None:
        try:
            with ResultsStore(url) as s:  # its own engine, like another seed's process
                for i in range(4):
                    values = {("baseline", "loss", k): float(k) for k in range(150)}
                    s.record_run(_run(f"w{worker}-{i}"), _metrics(values))
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with ResultsStore(url) as s:
        assert len(s.runs()) == 16 and _count(s, "metrics") == 16 * 150


# --------------------------------------------------------------------------- schema versioning
def test_newer_schema_is_refused_without_changes(tmp_path):
    url = _store_url(tmp_path)
    with ResultsStore(url) as s:
        s.record_run(_run("r1"), [])
        with s.engine.begin() as conn:
            conn.execute(update(schema_version_table).values(version=store_mod.SCHEMA_VERSION + 1))
    newer = store_mod.SCHEMA_VERSION + 1
    with pytest.raises(SchemaVersionError, match=rf"schema version {newer}.*upgrade monolm"):
        ResultsStore(url)
    engine = create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version FROM schema_version")).scalar_one() == newer
        assert conn.execute(text("SELECT COUNT(*) FROM runs")).scalar_one() == 1
    engine.dispose()


def test_foreign_database_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'other.sqlite'}"
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE runs (id INTEGER PRIMARY KEY, something TEXT)"))
    engine.dispose()
    with pytest.raises(SchemaVersionError, match="not a monolm results store"):
        ResultsStore(url)


def _all_at_once(n: int, action: Callable[[], object]) -> list[BaseException]:
    """Run `action` in `n` threads released together (a barrier, so they race for real); returns
    what they raised (an assertion in `action` included)."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            barrier.wait()
            action()
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


@pytest.mark.parametrize("attempt", range(3))
def test_concurrent_first_open_creates_schema_once(tmp_path, attempt):
    """Several processes opening a fresh store race on CREATE TABLE (seen for real on SQLite and
    PostgreSQL); every opener must succeed and exactly one version row must exist."""
    url = _store_url(tmp_path / f"fresh-{attempt}")
    assert not _all_at_once(8, lambda: ResultsStore(url).close())
    with ResultsStore(url) as s:
        assert _count(s, "schema_version") == 1 and s.schema_version() == store_mod.SCHEMA_VERSION


def test_schema_version_row_is_single(tmp_path):
    url = _store_url(tmp_path)
    for _ in range(3):
        ResultsStore(url).close()
    with ResultsStore(url) as s:
        assert _count(s, "schema_version") == 1


# --------------------------------------------------------------------------- migration from version 1
# The fixture: the schema exactly as monolm created it at schema version 1. Its schema_version and
# runs tables are today's (no migration has touched them: were one to, its ALTER would fail on this
# fixture, so the copy cannot silently drift); the metrics table as it was then (the Table
# definition of monolm/store.py at that version, copied), where it called the arm `model`.
V1 = MetaData()
store_schema.schema_version_table.to_metadata(V1)
store_schema.runs_table.to_metadata(V1)
V1_METRICS = Table(
    "metrics",
    V1,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(200), ForeignKey("runs.run_id", ondelete="CASCADE"), nullable=False, index=True),
    Column("seed", Integer),
    Column("model", String(100)),
    Column("variant", String(100)),
    Column("preset", String(100)),
    Column("recipe", String(50)),
    Column("stage", String(50)),
    Column("metric", String(200), nullable=False),
    Column("value", Double),
    Column("extra", JSON),
)
Index("ix_metrics_lookup", V1_METRICS.c.preset, V1_METRICS.c.variant, V1_METRICS.c.metric)

V1_ROWS = [  # (run_id, seed, arm, stage, metric, value, extra)
    ("v1-a", 42, "baseline", "evaluate", "token_perplexity", 23.5, None),
    ("v1-a", 42, "monotonic", "evaluate", "token_perplexity", 24.0, None),
    ("v1-a", None, "monotonic-baseline", "evaluate", "token_perplexity:t_p", None, {"nonfinite": "nan"}),
    ("v1-b", 42, "baseline", "evaluate", "token_perplexity", 22.0, {"n": 3}),
]


def _write_v1_store(url: str) -> None:
    """A store as monolm wrote it at schema version 1: two runs and their metric rows."""
    engine = create_engine(url)
    V1.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            insert(V1.tables["schema_version"]), [{"id": 1, "version": 1, "created_at": dt.datetime(2026, 1, 1)}]
        )
        conn.execute(
            insert(V1.tables["runs"]),
            [
                {
                    "run_id": run_id,
                    "run_name": run_id,
                    "created_at": dt.datetime(2026, 1, day),
                    "preset": "quick",
                    "model": "EleutherAI/pythia-1.4b",
                    "variant": "mlp_in",
                    "recipe": "fair",
                    "seeds": [42],
                    "status": "completed",
                }
                for day, run_id in enumerate(("v1-a", "v1-b"), start=1)
            ],
        )
        conn.execute(
            insert(V1_METRICS),
            [
                {
                    "run_id": run_id,
                    "seed": seed,
                    "model": arm,
                    "variant": "mlp_in",
                    "preset": "quick",
                    "recipe": "fair",
                    "stage": stage,
                    "metric": metric,
                    "value": value,
                    "extra": extra,
                }
                for run_id, seed, arm, stage, metric, value, extra in V1_ROWS
            ],
        )
    engine.dispose()


def _columns(url: str, table: str) -> list[str]:
    engine = create_engine(url)
    try:
        return [c["name"] for c in inspect(engine).get_columns(table)]
    finally:
        engine.dispose()


def _assert_v1_store_is_upgraded_in_place(url: str, fresh_url: str) -> None:
    _write_v1_store(url)
    assert "model" in _columns(url, "metrics")
    expected = sorted(
        (run_id, seed or 0, arm, metric, value, extra) for run_id, seed, arm, _, metric, value, extra in V1_ROWS
    )
    for _ in range(2):  # the second open finds the store current and changes nothing
        with ResultsStore(url) as s:
            assert s.schema_version() == store_mod.SCHEMA_VERSION
            rows = s.query()
            assert (
                sorted((r["run_id"], r["seed"] or 0, r["arm"], r["metric"], r["value"], r["extra"]) for r in rows)
                == expected
            )
            # The arm is `arm`; `model` is the run's model, filled in by version 3 (init: not recorded then).
            assert all(r["model"] == "EleutherAI/pythia-1.4b" and r["init"] is None for r in rows)
            assert [r["value"] for r in s.query(arm="monotonic", metric="token_perplexity")] == [24.0]
            assert s.get_run("v1-b")["model"] == "EleutherAI/pythia-1.4b"  # the runs table keeps `model`
            base = next(r for r in s.compare("v1-a", "v1-b") if r["arm"] == "baseline")
            assert base["diff"] == pytest.approx(-1.5)
            assert _count(s, "schema_version") == 1
    with ResultsStore(fresh_url):
        pass
    assert _columns(url, "metrics") == _columns(fresh_url, "metrics")  # as if created by this version
    with ResultsStore(url) as s:  # and it takes new runs
        s.record_run(_run("v2-c"), _metrics({("monotonic", "loss", 1): 1.0}))
        assert [r["arm"] for r in s.query(run_id="v2-c")] == ["monotonic"]


def _assert_failed_upgrade_leaves_v1_store_as_it_was(url: str, monkeypatch) -> None:
    _write_v1_store(url)
    rename = store_schema.MIGRATIONS[1]

    def rename_then_fail(conn) -> None:
        rename(conn)
        raise RuntimeError("killed midway")

    monkeypatch.setitem(store_schema.MIGRATIONS, 1, rename_then_fail)
    with pytest.raises(RuntimeError, match="killed midway"):
        ResultsStore(url)
    assert "model" in _columns(url, "metrics") and "arm" not in _columns(url, "metrics")
    engine = create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version FROM schema_version")).scalar_one() == 1
        assert conn.execute(text("SELECT COUNT(*) FROM metrics")).scalar_one() == len(V1_ROWS)
    engine.dispose()
    monkeypatch.setitem(store_schema.MIGRATIONS, 1, rename)
    with ResultsStore(url) as s:
        assert s.schema_version() == store_mod.SCHEMA_VERSION and len(s.query()) == len(V1_ROWS)


def test_v1_fixture_is_the_current_schema_but_for_the_arm_column_and_the_cell_columns():
    """Guards the fixture: version 1 differs from the current schema only in the arm's name (v2)
    and in the cell columns model and init that version 3 appends."""
    current = {name: [c.name for c in table.columns] for name, table in store_mod.metadata.tables.items()}
    old = {name: [c.name for c in table.columns] for name, table in V1.tables.items()}
    v2_metrics = [c for c in current["metrics"] if c not in ("model", "init")]
    assert current["metrics"][-2:] == ["model", "init"]
    assert old == {**current, "metrics": [("model" if c == "arm" else c) for c in v2_metrics]}
    assert store_mod.SCHEMA_VERSION == 3


def test_v1_store_is_upgraded_in_place(tmp_path):
    _assert_v1_store_is_upgraded_in_place(_store_url(tmp_path), _store_url(tmp_path / "fresh"))


def test_failed_upgrade_leaves_the_store_as_it_was(tmp_path, monkeypatch):
    _assert_failed_upgrade_leaves_v1_store_as_it_was(_store_url(tmp_path), monkeypatch)


def test_concurrent_openers_upgrade_a_v1_store_once(tmp_path):
    url = _store_url(tmp_path)
    _write_v1_store(url)

    def opener() -> None:
        with ResultsStore(url) as s:
            assert len(s.query(arm="baseline")) == 2

    assert not _all_at_once(6, opener)
    with ResultsStore(url) as s:
        assert s.schema_version() == store_mod.SCHEMA_VERSION and len(s.query()) == len(V1_ROWS)


# --------------------------------------------------------------------------- queries across runs
def test_runs_filters_and_order(store):
    store.record_run(_run("b", run_name="nightly-2", created_at="2026-01-02T00:00:00Z"), [])
    store.record_run(_run("a", run_name="nightly-1", created_at="2026-01-01T00:00:00Z"), [])
    store.record_run(_run("c", run_name="nightlyX", preset="quick", status="failed"), [])
    store.record_run(_run("d", run_name="manual", variant="mlp_both"), [])
    assert [r["run_id"] for r in store.runs()] == ["a", "c", "d", "b"]  # by created_at, ties by id
    assert [r["run_id"] for r in store.runs("tiny")] == ["a", "d", "b"]
    assert [r["run_id"] for r in store.runs(status="failed")] == ["c"]
    assert [r["run_id"] for r in store.runs(variant="mlp_both")] == ["d"]
    assert [r["run_id"] for r in store.runs(run_name_prefix="nightly-")] == ["a", "b"]
    assert [r["run_id"] for r in store.runs(run_name_prefix="nightly_")] == []  # '_' is not a wildcard


def test_compare_means_and_differences(store):
    values = {
        "a": {
            ("baseline", "loss", 1): 3.0,
            ("baseline", "loss", 2): 4.0,
            ("monotonic", "loss", 1): 5.0,
            ("monotonic", "acc", 1): 0.5,
        },
        "b": {
            ("baseline", "loss", 1): 2.0,
            ("baseline", "loss", 2): 2.5,
            ("monotonic", "loss", 1): 5.0,
            ("monotonic", "new", 1): 1.0,
        },
    }
    for run_id, metrics in values.items():
        store.record_run(_run(run_id), _metrics(metrics))
    rows = {(r["arm"], r["metric"]): r for r in store.compare("a", "b")}
    base = rows[("baseline", "loss")]
    assert (base["n_a"], base["mean_a"], base["n_b"], base["mean_b"]) == (2, 3.5, 2, 2.25)
    assert base["diff"] == pytest.approx(-1.25) and base["rel_diff"] == pytest.approx(-1.25 / 3.5)
    assert rows[("monotonic", "loss")]["diff"] == 0.0
    assert rows[("monotonic", "acc")]["mean_b"] is None and rows[("monotonic", "acc")]["diff"] is None
    assert rows[("monotonic", "new")]["n_a"] == 0 and rows[("monotonic", "new")]["mean_b"] == 1.0
    assert len(rows) == 4
    with pytest.raises(KeyError, match="zzz"):
        store.compare("a", "zzz")


def test_runs_are_found_by_id_name_or_unique_prefix(store):
    """What a user has in hand names the run: the ID, the name (the results folder), a prefix;
    an ambiguous or unknown reference is answered with the runs it could have meant."""
    store.record_run(_run("tiny-neox-mlp_in-fair-seeds-42-aaaa", run_name="tiny-neox-mlp_in-fair-seeds-42"), [])
    store.record_run(_run("tiny-neox-mlp_both-fair-seeds-42-bbbb", run_name="tiny-neox-mlp_both-fair-seeds-42"), [])
    store.record_run(_run("quick-pythia-cccc", run_name="quick-pythia", preset="quick"), [])
    assert store.resolve_run("quick-pythia-cccc")["run_id"] == "quick-pythia-cccc"
    assert store.resolve_run("tiny-neox-mlp_in-fair-seeds-42")["run_id"] == "tiny-neox-mlp_in-fair-seeds-42-aaaa"
    assert store.resolve_run("tiny-neox-mlp_b")["run_id"] == "tiny-neox-mlp_both-fair-seeds-42-bbbb"
    with pytest.raises(UnknownRun, match="prefix 'tiny-neox' matches 2 runs") as ambiguous:
        store.resolve_run("tiny-neox")
    assert "tiny-neox-mlp_in-fair-seeds-42-aaaa" in str(ambiguous.value)
    with pytest.raises(KeyError) as unknown:  # UnknownRun is a KeyError, as before
        store.resolve_run("tiny-neox-mlp_in-fair-seed-42")
    message = str(unknown.value)
    assert message.startswith("no run 'tiny-neox-mlp_in-fair-seed-42'") and "closest known runs" in message
    assert "tiny-neox-mlp_in-fair-seeds-42-aaaa" in message and not message.startswith('"')
    rows = store.compare("tiny-neox-mlp_in-fair-seeds-42", "quick")  # by name and by prefix
    assert rows == []


def test_previous_run_for_nightly_regression(store):
    assert store.previous_run("quick") is None  # the very first nightly run
    store.record_run(_run("n1", preset="quick", run_name="nightly-1", created_at="2026-01-01T03:00:00Z"), [])
    store.record_run(_run("n2", preset="quick", run_name="nightly-2", created_at="2026-01-02T03:00:00Z"), [])
    store.record_run(
        _run("n3", preset="quick", run_name="nightly-3", created_at="2026-01-03T03:00:00Z", status="failed"), []
    )
    store.record_run(_run("m1", preset="quick", run_name="manual", created_at="2026-01-03T04:00:00Z"), [])
    store.record_run(_run("n4", preset="quick", run_name="nightly-4", created_at="2026-01-04T03:00:00Z"), [])
    store.record_run(_run("t1", preset="tiny", run_name="nightly-x", created_at="2026-01-05T03:00:00Z"), [])
    assert store.previous_run("quick")["run_id"] == "n4"
    assert store.previous_run("quick", before_run_id="n4")["run_id"] == "m1"
    assert store.previous_run("quick", before_run_id="n4", run_name_prefix="nightly-")["run_id"] == "n2"
    assert store.previous_run("quick", before_run_id="n4", run_name_prefix="nightly-", status=None)["run_id"] == "n3"
    assert store.previous_run("quick", before_run_id="n1") is None
    # same timestamp: ordered by run_id so the answer is still deterministic
    store.record_run(_run("n5", preset="quick", run_name="nightly-5", created_at="2026-01-04T03:00:00Z"), [])
    assert store.previous_run("quick", before_run_id="n5")["run_id"] == "n4"
    with pytest.raises(KeyError, match="nope"):
        store.previous_run("quick", before_run_id="nope")


# --------------------------------------------------------------------------- display
def test_format_table(store):
    assert format_table([]) == "(no results)"
    store.record_run(
        _run("r1"),
        [
            {
                "seed": 42,
                "arm": "monotonic",
                "stage": "uat",
                "metric": "loss_increase",
                "value": 0.123456789,
                "extra": {"k": [1, 2]},
            },
            {"seed": 42, "arm": "baseline", "stage": "uat", "metric": "loss_increase", "value": None},
        ],
    )
    out = format_table(store.query(), columns=["run_id", "arm", "metric", "value", "extra"], title="results")
    lines = out.splitlines()
    assert "results" in lines[0]
    assert all(h in out for h in ("run_id", "arm", "metric", "value", "extra"))
    assert "0.123457" in out and '{"k":[1,2]}' in out and "—" in out
    assert "seed" not in out  # only the requested columns
    baseline_line = next(line for line in lines if "baseline" in line)
    assert "r1" in baseline_line and "loss_increase" in baseline_line


# --------------------------------------------------------------------------- PostgreSQL
@pytest.fixture(scope="module")
def postgres_url():
    """MONOLM_TEST_POSTGRES_URL if given (a disposable database, sync driver, e.g.
    postgresql+psycopg://user:pw@127.0.0.1:5432/db); otherwise a throwaway PostgreSQL started by
    infra/postgres/postgres.sh (installed with apt if missing) and stopped afterwards."""
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    if os.environ.get("MONOLM_TEST_POSTGRES_URL"):
        yield os.environ["MONOLM_TEST_POSTGRES_URL"]
        return
    script = str(Path(__file__).resolve().parents[1] / "infra" / "postgres" / "postgres.sh")
    state = Path(tempfile.mkdtemp(prefix="monolm-store-test-"))
    state.chmod(0o755)  # PostgreSQL runs as the postgres system user
    env = {**os.environ, "MONOLM_STATE_DIR": str(state)}
    try:
        install = subprocess.run([script, "install"], env=env, capture_output=True, text=True, timeout=900)
        if install.returncode:
            pytest.skip(f"PostgreSQL is not installed and could not be installed here: {install.stderr[-300:]}")
        subprocess.run([script, "start"], env=env, capture_output=True, text=True, timeout=300, check=True)
        url = subprocess.run([script, "url"], env=env, capture_output=True, text=True, timeout=60, check=True).stdout
        yield url.strip().replace("postgresql+asyncpg://", "postgresql+psycopg://")
    finally:
        subprocess.run([script, "stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


@pytest.mark.postgres
@pytest.mark.timeout(900)
def test_postgresql_round_trip(postgres_url):
    """The same code path as SQLite, on a real PostgreSQL."""
    url = postgres_url
    with ResultsStore(url) as s:
        s.record_run(
            _run("pg-a", created_at="2026-01-01T00:00:00Z"),
            _metrics({("baseline", "loss", 1): 3.0, ("baseline", "loss", 2): 4.0}),
        )
        s.record_run(
            _run("pg-b", created_at="2026-01-02T00:00:00Z"),
            _metrics({("baseline", "loss", 1): 2.0}) + [{"metric": "x", "value": float("nan"), "extra": {"u": "ü"}}],
        )
        many = _metrics({("monotonic", "loss", k): 1.0 for k in range(700)})
        many[650]["value"] = "corrupt"
        with pytest.raises(ValueError):
            s.record_run(_run("pg-a"), many)
        assert [r["value"] for r in s.query(run_id="pg-a")] == [3.0, 4.0]
        loss = next(r for r in s.compare("pg-a", "pg-b") if r["metric"] == "loss")
        assert loss["diff"] == pytest.approx(-1.5)
        assert s.previous_run("tiny", before_run_id="pg-b")["run_id"] == "pg-a"
        assert s.query(metric="x")[0]["extra"] == {"u": "ü", "nonfinite": "nan"}
        for run_id in ("pg-a", "pg-b"):
            s.delete_run(run_id)
    with ResultsStore(url) as again:
        assert again.schema_version() == store_mod.SCHEMA_VERSION


@pytest.fixture
def postgres_schemas(postgres_url):
    """URLs of the throwaway database that see only fresh, empty PostgreSQL schemas (one per call
    of the returned function), so these tests never meet the tables of the round trip above."""
    engine = create_engine(postgres_url)
    created: list[str] = []

    def new_schema_url() -> str:
        name = f"monolm_test_{len(created)}_{os.getpid()}"
        with engine.begin() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {name} CASCADE"))
            conn.execute(text(f"CREATE SCHEMA {name}"))
        created.append(name)
        url = make_url(postgres_url).update_query_dict({"options": f"-csearch_path={name}"})
        return url.render_as_string(hide_password=False)

    yield new_schema_url
    with engine.begin() as conn:
        for name in created:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {name} CASCADE"))
    engine.dispose()


@pytest.mark.postgres
@pytest.mark.timeout(900)
def test_postgresql_v1_store_is_upgraded_in_place(postgres_schemas):
    _assert_v1_store_is_upgraded_in_place(postgres_schemas(), postgres_schemas())


@pytest.mark.postgres
@pytest.mark.timeout(900)
def test_postgresql_failed_upgrade_leaves_the_store_as_it_was(postgres_schemas, monkeypatch):
    _assert_failed_upgrade_leaves_v1_store_as_it_was(postgres_schemas(), monkeypatch)
