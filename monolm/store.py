"""Results store: every run's metrics in one SQL database, queryable across runs.

Why a database and not only the per-stage manifests: the nightly regression check and
`monolm results` ask questions across runs ("the previous quick run's baseline perplexity",
"all mlp_both runs' UAT loss increase"), which is a query, not a directory walk. Why SQLAlchemy
Core: one code path for SQLite (the default, a file under the runs root, nothing to install) and
PostgreSQL or any other backend (a team server), chosen only by the URL. Use a synchronous
driver, e.g. `postgresql+psycopg://user@host/db`.

Guarantees:
* `record_run` is one transaction: a run's row and all its metric rows are stored together or
  not at all (a crash midway cannot leave half a run), and recording the same `run_id` again
  replaces the previous version (re-running the aggregate stage is idempotent).
* The schema is created on first use and versioned in `schema_version`; a store written by a
  newer monolm is refused with a clear error instead of being misread or altered.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Double,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    and_,
    create_engine,
    delete,
    event,
    insert,
    inspect,
    make_url,
    or_,
    select,
)
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from monolm.artifacts import json_default

SCHEMA_VERSION = 1
RUN_STATUSES = ("running", "completed", "failed", "partial")
INSERT_CHUNK = 500  # metric rows per INSERT statement

metadata = MetaData()

schema_version_table = Table(
    "schema_version",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),  # always 1: one row
    Column("version", Integer, nullable=False),
    Column("created_at", DateTime, nullable=False),
)

runs_table = Table(
    "runs",
    metadata,
    Column("run_id", String(200), primary_key=True),
    Column("run_name", String(200), index=True),
    Column("created_at", DateTime, nullable=False, index=True),  # naive UTC on every backend
    Column("preset", String(100), index=True),
    Column("model", String(300)),  # the model name, e.g. EleutherAI/pythia-1.4b
    Column("variant", String(100)),
    Column("recipe", String(50)),
    Column("config_digest", String(64)),
    Column("code_revision", String(100)),
    Column("seeds", JSON),
    Column("status", String(20), nullable=False),
)

metrics_table = Table(
    "metrics",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(200), ForeignKey("runs.run_id", ondelete="CASCADE"), nullable=False, index=True),
    Column("seed", Integer),  # None for across-seed aggregates
    Column("model", String(100)),  # the arm: base / baseline / monotonic
    Column("variant", String(100)),
    Column("preset", String(100)),
    Column("recipe", String(50)),
    Column("stage", String(50)),
    Column("metric", String(200), nullable=False),
    Column("value", Double),  # None: not computable (e.g. a p-value with n=1); see extra
    Column("extra", JSON),
)
Index("ix_metrics_lookup", metrics_table.c.preset, metrics_table.c.variant, metrics_table.c.metric)

RUN_FIELDS = tuple(c.name for c in runs_table.columns)
METRIC_FIELDS = ("seed", "model", "variant", "preset", "recipe", "stage", "metric", "value", "extra")
INHERITED = ("variant", "preset", "recipe")  # metric rows default to their run's values


class SchemaVersionError(RuntimeError):
    """The database was written by a different (newer) schema than this code understands."""


# --------------------------------------------------------------------------- value conversion
def _utc_naive(value: Any) -> dt.datetime:
    """Timestamps are stored as naive UTC: SQLite has no time zones, and one convention on all
    backends keeps ordering comparisons correct."""
    if value is None:
        value = dt.datetime.now(dt.timezone.utc)
    elif isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if not isinstance(value, dt.datetime):
        raise ValueError(f"created_at must be a datetime or ISO string, got {value!r}")
    if value.tzinfo is not None:
        value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return value


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.replace(tzinfo=dt.timezone.utc).isoformat()


def _json_safe(value: Any, what: str) -> Any:
    """JSON columns must hold strict JSON (PostgreSQL rejects NaN/Infinity)."""
    try:
        return json.loads(json.dumps(value, allow_nan=False, default=json_default))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not JSON-serializable ({exc}): {value!r}") from None


def _run_row(run: dict[str, Any]) -> dict[str, Any]:
    unknown = set(run) - set(RUN_FIELDS)
    if unknown:
        raise ValueError(f"record_run: unknown run field(s) {sorted(unknown)}; allowed: {', '.join(RUN_FIELDS)}")
    run_id = run.get("run_id")
    if not isinstance(run_id, str) or not run_id:
        raise ValueError(f"record_run: run_id must be a non-empty string, got {run_id!r}")
    status = run.get("status", "completed")
    if status not in RUN_STATUSES:
        raise ValueError(f"record_run: status={status!r} is not one of {', '.join(RUN_STATUSES)}")
    row = {field: run.get(field) for field in RUN_FIELDS}
    row.update(
        created_at=_utc_naive(run.get("created_at")),
        status=status,
        seeds=_json_safe(list(run["seeds"]), "seeds") if run.get("seeds") is not None else None,
    )
    return row


def _metric_row(run: dict[str, Any], metric: dict[str, Any], index: int) -> dict[str, Any]:
    """One validated `metrics` row. Non-finite values are stored as NULL and the original kept
    in `extra["nonfinite"]`, so a diverged run is recorded (and visible) rather than lost."""
    where = f"metrics[{index}]"
    unknown = set(metric) - set(METRIC_FIELDS)
    if unknown:
        raise ValueError(f"record_run: {where} has unknown field(s) {sorted(unknown)}; allowed: {', '.join(METRIC_FIELDS)}")
    name = metric.get("metric")
    if not isinstance(name, str) or not name:
        raise ValueError(f"record_run: {where} needs a non-empty 'metric' name, got {name!r}")
    if "value" not in metric:
        raise ValueError(f"record_run: {where} ({name}) has no 'value'")
    extra = dict(metric.get("extra") or {})
    raw = metric["value"]
    if raw is None:
        value = None
    else:
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"record_run: {where} ({name}) value {raw!r} is not a number") from None
        if not math.isfinite(value):
            extra["nonfinite"] = repr(value)
            value = None
    seed = metric.get("seed")
    row = {
        "run_id": run["run_id"],
        "seed": int(seed) if seed is not None else None,
        "model": metric.get("model"),
        "stage": metric.get("stage"),
        "metric": name,
        "value": value,
        "extra": _json_safe(extra, f"{where} ({name}) extra") if extra else None,
    }
    for field in INHERITED:
        row[field] = metric.get(field, run.get(field))
    return row


# --------------------------------------------------------------------------- the store
class ResultsStore:
    """`ResultsStore(url)` with any SQLAlchemy URL; the schema is created on first use."""

    def __init__(self, url: str, *, echo: bool = False):
        parsed = make_url(url)
        connect_args: dict[str, Any] = {}
        if parsed.get_backend_name() == "sqlite":
            database = parsed.database
            if database and database != ":memory:" and not database.startswith("file:"):
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            connect_args["timeout"] = 60  # seeds finishing together wait for the write lock
        self.url = parsed.render_as_string(hide_password=True)
        self.engine: Engine = create_engine(parsed, echo=echo, connect_args=connect_args)
        if parsed.get_backend_name() == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._ensure_schema()

    @classmethod
    def from_config(cls, cfg: Any) -> "ResultsStore":
        """The store an `ExperimentConfig` names (`paths.store_url`, default under runs_root)."""
        return cls(cfg.store_url)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "ResultsStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ schema
    def schema_version(self) -> int | None:
        with self.engine.connect() as conn:
            return conn.execute(
                select(schema_version_table.c.version).where(schema_version_table.c.id == 1)
            ).scalar_one_or_none()

    def _ensure_schema(self) -> None:
        """Create or check the schema. Two processes opening a fresh store at once can race on
        CREATE TABLE; the loser sees "already exists" and simply checks again."""
        attempts = 5  # each failure means another opener made progress on the same few DDL steps
        for attempt in range(attempts):
            try:
                self._create_or_check_schema()
                return
            except (OperationalError, ProgrammingError, IntegrityError):
                if attempt == attempts - 1:
                    raise

    def _create_or_check_schema(self) -> None:
        tables = set(inspect(self.engine).get_table_names())
        if "schema_version" in tables:
            self._check_version(self.schema_version())
        elif tables & {"runs", "metrics"}:
            raise SchemaVersionError(
                f"{self.url} has tables {sorted(tables & {'runs', 'metrics'})} but no schema_version "
                "table: it is not a monolm results store; use another store_url"
            )
        # schema_version first, so a concurrent opener never sees runs without it
        schema_version_table.create(self.engine, checkfirst=True)
        metadata.create_all(self.engine, checkfirst=True)
        if self.schema_version() is None:
            try:
                with self.engine.begin() as conn:
                    conn.execute(insert(schema_version_table),
                                 [{"id": 1, "version": SCHEMA_VERSION, "created_at": _utc_naive(None)}])
            except IntegrityError:
                pass  # a concurrent opener inserted it between our check and our insert
        self._check_version(self.schema_version())

    def _check_version(self, version: int | None) -> None:
        if version is None:
            return  # being created (by us or a concurrent process)
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"results store {self.url} has schema version {version}, but this monolm understands "
                f"up to version {SCHEMA_VERSION}; upgrade monolm (the store was not modified)"
            )
        if version < SCHEMA_VERSION:  # no older versions exist yet; a migration would go here
            raise SchemaVersionError(
                f"results store {self.url} has schema version {version} < {SCHEMA_VERSION} and no "
                "migration is available"
            )

    # ------------------------------------------------------------------ writing
    def record_run(self, run: dict[str, Any], metrics: Iterable[dict[str, Any]]) -> int:
        """Store one run and its metric rows atomically, replacing any earlier version of the same
        `run_id`. Metric rows inherit variant/preset/recipe from the run unless they set them.
        Returns the number of metric rows written."""
        run_row = _run_row(run)
        written = 0
        with self.engine.begin() as conn:  # one transaction: commit at the end or roll back
            conn.execute(delete(metrics_table).where(metrics_table.c.run_id == run_row["run_id"]))
            conn.execute(delete(runs_table).where(runs_table.c.run_id == run_row["run_id"]))
            conn.execute(insert(runs_table), [run_row])
            chunk: list[dict[str, Any]] = []
            for index, metric in enumerate(metrics):
                chunk.append(_metric_row(run_row, metric, index))
                if len(chunk) >= INSERT_CHUNK:
                    conn.execute(insert(metrics_table), chunk)
                    written += len(chunk)
                    chunk = []
            if chunk:
                conn.execute(insert(metrics_table), chunk)
                written += len(chunk)
        return written

    def delete_run(self, run_id: str) -> bool:
        with self.engine.begin() as conn:
            conn.execute(delete(metrics_table).where(metrics_table.c.run_id == run_id))
            return conn.execute(delete(runs_table).where(runs_table.c.run_id == run_id)).rowcount > 0

    # ------------------------------------------------------------------ reading
    def get_run(self, run_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(runs_table).where(runs_table.c.run_id == run_id)).mappings().first()
        return _run_dict(row) if row else None

    def runs(
        self,
        preset: str | None = None,
        *,
        status: str | None = None,
        variant: str | None = None,
        model: str | None = None,
        run_name_prefix: str | None = None,
    ) -> list[dict[str, Any]]:
        """Runs matching all given filters, oldest first. `model` is the model name here (the
        runs table has one model; the per-arm name lives in metric rows)."""
        r = runs_table.c
        query = select(runs_table).where(*_equals(r, preset=preset, status=status, variant=variant, model=model))
        if run_name_prefix is not None:
            query = query.where(r.run_name.startswith(run_name_prefix, autoescape=True))
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(r.created_at, r.run_id)).mappings().all()
        return [_run_dict(row) for row in rows]

    def query(
        self,
        preset: str | None = None,
        variant: str | None = None,
        model: str | None = None,
        metric: str | None = None,
        *,
        run_id: str | None = None,
        stage: str | None = None,
        seed: int | None = None,
        recipe: str | None = None,
    ) -> list[dict[str, Any]]:
        """Metric rows matching all given filters (`model` is the arm: base/baseline/monotonic),
        with their run's name, creation time and code revision, oldest run first."""
        m, r = metrics_table.c, runs_table.c
        query = (
            select(m.run_id, r.run_name, r.created_at, r.code_revision, m.preset, m.variant, m.recipe,
                   m.model, m.seed, m.stage, m.metric, m.value, m.extra)
            .join_from(metrics_table, runs_table, m.run_id == r.run_id)
            .where(*_equals(m, preset=preset, variant=variant, model=model, metric=metric, run_id=run_id,
                            stage=stage, seed=seed, recipe=recipe))
            .order_by(r.created_at, m.run_id, m.model, m.stage, m.metric, m.seed, m.id)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [{**row, "created_at": _iso(row["created_at"])} for row in rows]

    def compare(self, run_a: str, run_b: str) -> list[dict[str, Any]]:
        """Metric by metric (per arm and stage): mean over seeds in each run and the difference
        `mean_b - mean_a`. Metrics present in only one run are listed with None on the other side."""
        for run_id in (run_a, run_b):
            if self.get_run(run_id) is None:
                raise KeyError(f"no run {run_id!r} in results store {self.url}")
        means = {run_a: _means(self.query(run_id=run_a)), run_b: _means(self.query(run_id=run_b))}
        keys = sorted(set(means[run_a]) | set(means[run_b]), key=lambda k: tuple("" if x is None else x for x in k))
        out = []
        for key in keys:
            (n_a, mean_a), (n_b, mean_b) = means[run_a].get(key, (0, None)), means[run_b].get(key, (0, None))
            diff = mean_b - mean_a if mean_a is not None and mean_b is not None else None
            rel = diff / abs(mean_a) if diff is not None and mean_a else None
            model, stage, metric = key
            out.append({"model": model, "stage": stage, "metric": metric, "n_a": n_a, "mean_a": mean_a,
                        "n_b": n_b, "mean_b": mean_b, "diff": diff, "rel_diff": rel})
        return out

    def previous_run(
        self,
        preset: str,
        before_run_id: str | None = None,
        run_name_prefix: str | None = None,
        *,
        status: str | None = "completed",
    ) -> dict[str, Any] | None:
        """The latest run of `preset` (with `status`, default completed) created before
        `before_run_id` (or the latest overall), optionally only runs whose name starts with
        `run_name_prefix` (e.g. "nightly-"). None when there is none: the first nightly run."""
        r = runs_table.c
        query = select(runs_table).where(*_equals(r, preset=preset, status=status))
        if run_name_prefix is not None:
            query = query.where(r.run_name.startswith(run_name_prefix, autoescape=True))
        if before_run_id is not None:
            with self.engine.connect() as conn:
                pivot = conn.execute(select(r.created_at).where(r.run_id == before_run_id)).scalar_one_or_none()
            if pivot is None:
                raise KeyError(f"no run {before_run_id!r} in results store {self.url}")
            query = query.where(or_(r.created_at < pivot, and_(r.created_at == pivot, r.run_id < before_run_id)))
        with self.engine.connect() as conn:
            row = conn.execute(query.order_by(r.created_at.desc(), r.run_id.desc()).limit(1)).mappings().first()
        return _run_dict(row) if row else None


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _equals(columns: Any, **filters: Any) -> list[Any]:
    return [getattr(columns, name) == value for name, value in filters.items() if value is not None]


def _run_dict(row: Any) -> dict[str, Any]:
    out = dict(row)
    out["created_at"] = _iso(out["created_at"])
    return out


def _means(rows: Sequence[dict[str, Any]]) -> dict[tuple[Any, Any, Any], tuple[int, float | None]]:
    groups: dict[tuple[Any, Any, Any], list[float]] = defaultdict(list)
    for row in rows:
        values = groups[(row["model"], row["stage"], row["metric"])]  # listed even if all None
        if row["value"] is not None:
            values.append(row["value"])
    return {k: (len(v), math.fsum(v) / len(v) if v else None) for k, v in groups.items()}


# --------------------------------------------------------------------------- display
def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        text = json.dumps(value, separators=(",", ":"), default=str)
        return text if len(text) <= 60 else text[:57] + "..."
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], *, columns: Sequence[str] | None = None,
                 title: str | None = None, width: int = 200) -> str:
    """Render result rows (from `query`, `runs` or `compare`) as a text table for the terminal;
    columns default to the keys of the first row, in order."""
    if not rows:
        return "(no results)"
    from rich.console import Console
    from rich.table import Table as RichTable

    columns = list(columns or rows[0].keys())
    table = RichTable(title=title, show_lines=False)
    for column in columns:
        numeric = any(isinstance(row.get(column), (int, float)) and not isinstance(row.get(column), bool)
                      for row in rows)
        table.add_column(column, justify="right" if numeric else "left", overflow="fold")
    for row in rows:
        table.add_row(*(_cell(row.get(column)) for column in columns))
    buffer = io.StringIO()
    Console(file=buffer, width=width, color_system=None, force_terminal=False, soft_wrap=False).print(table)
    return buffer.getvalue().rstrip("\n")
