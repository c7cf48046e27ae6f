"""`ResultsStore`: record a run and its metric rows atomically; query them across runs.

Guarantees:
* `record_run` is one transaction: a run's row and all its metric rows are stored together or
  not at all (a crash midway cannot leave half a run), and recording the same `run_id` again
  replaces the previous version (re-running the aggregate stage is idempotent).
* The schema is created, checked or upgraded when the store is opened (`monolm.store.schema`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, and_, create_engine, delete, event, insert, or_, select

from monolm.config.store_url import connect_url
from monolm.store.lookup import UnknownRun, match_run
from monolm.store.rows import iso, metric_row, run_dict, run_row
from monolm.store.schema import ensure_schema, metrics_table, read_version, runs_table

INSERT_CHUNK = 500  # metric rows per INSERT statement


class ResultsStore:
    """`ResultsStore(url)` with any SQLAlchemy URL; the schema is created on first use."""

    def __init__(self, url: str, *, echo: bool = False):
        parsed = connect_url(url)  # a password kept out of the config comes from the environment
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
        ensure_schema(self.engine, self.url)

    @classmethod
    def from_config(cls, cfg: Any) -> ResultsStore:
        """The store an `ExperimentConfig` names (`paths.store_url`, default under runs_root)."""
        return cls(cfg.store_url)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ schema
    def schema_version(self) -> int | None:
        return read_version(self.engine)

    # ------------------------------------------------------------------ writing
    def record_run(self, run: dict[str, Any], metrics: Iterable[dict[str, Any]]) -> int:
        """Store one run and its metric rows atomically, replacing any earlier version of the same
        `run_id`. Metric rows inherit variant/preset/recipe from the run unless they set them.
        Returns the number of metric rows written."""
        row = run_row(run)
        written = 0
        with self.engine.begin() as conn:  # one transaction: commit at the end or roll back
            conn.execute(delete(metrics_table).where(metrics_table.c.run_id == row["run_id"]))
            conn.execute(delete(runs_table).where(runs_table.c.run_id == row["run_id"]))
            conn.execute(insert(runs_table), [row])
            chunk: list[dict[str, Any]] = []
            for index, metric in enumerate(metrics):
                chunk.append(metric_row(row, metric, index))
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
        return run_dict(row) if row else None

    def resolve_run(self, ref: str) -> dict[str, Any]:
        """The run `ref` names: its ID, its name, or a unique prefix of either (`UnknownRun`, a
        KeyError listing the closest known runs, otherwise)."""
        found = self.get_run(ref)
        return found if found is not None else match_run(ref, self.runs(), self.url)

    def runs(
        self,
        preset: str | None = None,
        *,
        status: str | None = None,
        variant: str | None = None,
        model: str | None = None,
        run_name_prefix: str | None = None,
    ) -> list[dict[str, Any]]:
        """Runs matching all given filters, oldest first (`model`: the model name, e.g.
        EleutherAI/pythia-1.4b)."""
        r = runs_table.c
        query = select(runs_table).where(*_equals(r, preset=preset, status=status, variant=variant, model=model))
        if run_name_prefix is not None:
            query = query.where(r.run_name.startswith(run_name_prefix, autoescape=True))
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(r.created_at, r.run_id)).mappings().all()
        return [run_dict(row) for row in rows]

    def query(
        self,
        preset: str | None = None,
        variant: str | None = None,
        arm: str | None = None,
        metric: str | None = None,
        *,
        run_id: str | None = None,
        stage: str | None = None,
        seed: int | None = None,
        recipe: str | None = None,
        model: str | None = None,
        init: str | None = None,
    ) -> list[dict[str, Any]]:
        """Metric rows matching all given filters (`arm`: base, baseline, monotonic, monotonic-baseline;
        `model`, `variant`, `init`: the grid cell), with their run's name, creation time and code
        revision, oldest run first."""
        m, r = metrics_table.c, runs_table.c
        query = (
            select(
                m.run_id,
                r.run_name,
                r.created_at,
                r.code_revision,
                m.preset,
                m.model,
                m.variant,
                m.init,
                m.recipe,
                m.arm,
                m.seed,
                m.stage,
                m.metric,
                m.value,
                m.extra,
            )
            .join_from(metrics_table, runs_table, m.run_id == r.run_id)
            .where(
                *_equals(
                    m,
                    preset=preset,
                    variant=variant,
                    arm=arm,
                    metric=metric,
                    run_id=run_id,
                    stage=stage,
                    seed=seed,
                    recipe=recipe,
                    model=model,
                    init=init,
                )
            )
            .order_by(r.created_at, m.run_id, m.arm, m.stage, m.metric, m.model, m.variant, m.init, m.seed, m.id)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [{**row, "created_at": iso(row["created_at"])} for row in rows]

    def compare(self, run_a: str, run_b: str) -> list[dict[str, Any]]:
        """Metric by metric (per arm and stage): mean over seeds on each side and the difference
        `mean_b - mean_a`. Metrics present on one side only are listed with None on the other.
        A side is a run, named by ID, name or unique prefix (`resolve_run`), or one cell of a
        grid run: `<run>@<cell>`, the cell as `<variant>`, `<variant>-<init>` or
        `<model>/<variant>-<init>` (e.g. `my-run@mlp_both`), so two variants of one run compare
        like two runs. A grid run of several cells must be given a cell."""
        rows = [self.cell_rows(ref) for ref in (run_a, run_b)]
        means = [_means(side) for side in rows]
        keys = sorted(set(means[0]) | set(means[1]), key=lambda k: tuple("" if x is None else x for x in k))
        out = []
        for key in keys:
            (n_a, mean_a), (n_b, mean_b) = means[0].get(key, (0, None)), means[1].get(key, (0, None))
            diff = mean_b - mean_a if mean_a is not None and mean_b is not None else None
            rel = diff / abs(mean_a) if diff is not None and mean_a else None
            arm, stage, metric = key
            out.append(
                {
                    "arm": arm,
                    "stage": stage,
                    "metric": metric,
                    "n_a": n_a,
                    "mean_a": mean_a,
                    "n_b": n_b,
                    "mean_b": mean_b,
                    "diff": diff,
                    "rel_diff": rel,
                }
            )
        return out

    def cell_rows(self, ref: str) -> list[dict[str, Any]]:
        """The metric rows of `<run>` or `<run>@<cell>` (see `compare`)."""
        run_ref, _, cell = ref.partition("@")
        rows = self.query(run_id=self.resolve_run(run_ref)["run_id"])
        cells = sorted({cell_label(r) for r in rows})
        if cell:
            chosen = [c for c in cells if cell in (c, c.split("/", 1)[1], c.split("/", 1)[1].rsplit("-", 1)[0])]
            if len(chosen) != 1:
                raise UnknownRun(
                    f"{ref!r}: {'no' if not chosen else 'more than one'} cell of run {run_ref!r} matches {cell!r}; "
                    f"its cells: {', '.join(cells)}"
                )
            return [r for r in rows if cell_label(r) == chosen[0]]
        if len(cells) > 1:
            raise UnknownRun(
                f"run {run_ref!r} is a grid of {len(cells)} cells; name one as {run_ref}@<cell>: {', '.join(cells)}"
            )
        return rows

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
                raise UnknownRun(f"no run {before_run_id!r} in results store {self.url}")
            query = query.where(or_(r.created_at < pivot, and_(r.created_at == pivot, r.run_id < before_run_id)))
        with self.engine.connect() as conn:
            row = conn.execute(query.order_by(r.created_at.desc(), r.run_id.desc()).limit(1)).mappings().first()
        return run_dict(row) if row else None


def cell_label(row: dict[str, Any]) -> str:
    """`<model>/<variant>-<init>` of a metric row (`?` for what an older store did not record)."""
    return f"{row.get('model') or '?'}/{row.get('variant') or '?'}-{row.get('init') or '?'}"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _equals(columns: Any, **filters: Any) -> list[Any]:
    return [getattr(columns, name) == value for name, value in filters.items() if value is not None]


def _means(rows: Sequence[dict[str, Any]]) -> dict[tuple[Any, Any, Any], tuple[int, float | None]]:
    groups: dict[tuple[Any, Any, Any], list[float]] = defaultdict(list)
    for row in rows:
        values = groups[(row["arm"], row["stage"], row["metric"])]  # listed even if all None
        if row["value"] is not None:
            values.append(row["value"])
    return {k: (len(v), math.fsum(v) / len(v) if v else None) for k, v in groups.items()}
