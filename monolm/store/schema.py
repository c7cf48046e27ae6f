"""The results store's tables and their version: created on first use, checked on every open.

The version lives in the one-row table `schema_version`. A store written by an older monolm is
upgraded in place when opened, one version step after another (`MIGRATIONS`), in one
transaction; a store written by a newer monolm is refused with a clear error instead of being
misread or altered.

Versions: 1, the first; 2, the metrics table's arm column renamed from `model` to `arm` (the runs
table and the config use `model` for the Hugging Face model); 3, metrics rows name their grid
cell: `model` (the model's name on the grid) and `init`, besides `variant` (a run of a grid has
rows of many cells).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import (
    JSON,
    Column,
    Connection,
    DateTime,
    Double,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

SCHEMA_VERSION = 3

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
    Column("arm", String(100)),  # base / baseline / monotonic, or monotonic-baseline for a comparison
    Column("variant", String(100)),
    Column("preset", String(100)),
    Column("recipe", String(50)),
    Column("stage", String(50)),
    Column("metric", String(200), nullable=False),
    Column("value", Double),  # None: not computable (e.g. a p-value with n=1); see extra
    Column("extra", JSON),
    # Version 3 (after `extra`, where ALTER TABLE puts them when upgrading an older store):
    Column("model", String(300)),  # the cell's model (its name on the grid's model axis)
    Column("init", String(50)),  # the cell's conversion of pretrained weights (constraint.init)
)
Index("ix_metrics_lookup", metrics_table.c.preset, metrics_table.c.variant, metrics_table.c.metric)


class SchemaVersionError(RuntimeError):
    """The database is not a store this code can use: written by a newer monolm, of a version no
    migration covers, or not a monolm results store at all."""


def _rename_arm_column(conn: Connection) -> None:
    """Version 1 -> 2: the metrics table's arm column was called `model`."""
    conn.execute(text("ALTER TABLE metrics RENAME COLUMN model TO arm"))


def _add_cell_columns(conn: Connection) -> None:
    """Version 2 -> 3: metric rows name their grid cell (model, init); rows of earlier runs take
    their run's model (their init was not recorded)."""
    conn.execute(text("ALTER TABLE metrics ADD COLUMN model VARCHAR(300)"))
    conn.execute(text("ALTER TABLE metrics ADD COLUMN init VARCHAR(50)"))
    conn.execute(text("UPDATE metrics SET model = (SELECT runs.model FROM runs WHERE runs.run_id = metrics.run_id)"))


# version n -> the step that upgrades a store of version n to version n + 1
MIGRATIONS: dict[int, Callable[[Connection], None]] = {1: _rename_arm_column, 2: _add_cell_columns}


def read_version(engine: Engine) -> int | None:
    """The store's schema version; None while a concurrent opener is still creating it."""
    with engine.connect() as conn:
        return conn.execute(
            select(schema_version_table.c.version).where(schema_version_table.c.id == 1)
        ).scalar_one_or_none()


def ensure_schema(engine: Engine, url: str) -> None:
    """Create or check the schema. Two processes opening a fresh store at once can race on
    CREATE TABLE; the loser sees "already exists" and simply checks again."""
    attempts = 5  # each failure means another opener made progress on the same few DDL steps
    for attempt in range(attempts):
        try:
            _create_or_check_schema(engine, url)
            return
        except (OperationalError, ProgrammingError, IntegrityError):
            if attempt == attempts - 1:
                raise


def _create_or_check_schema(engine: Engine, url: str) -> None:
    tables = set(inspect(engine).get_table_names())
    if "schema_version" in tables:
        version = read_version(engine)
        _check_version(version, url)
        if version is not None and version < SCHEMA_VERSION:
            migrate(engine, url)
    elif tables & {"runs", "metrics"}:
        raise SchemaVersionError(
            f"{url} has tables {sorted(tables & {'runs', 'metrics'})} but no schema_version "
            "table: it is not a monolm results store; use another store_url"
        )
    # schema_version first, so a concurrent opener never sees runs without it
    schema_version_table.create(engine, checkfirst=True)
    metadata.create_all(engine, checkfirst=True)
    if read_version(engine) is None:
        row = {"id": 1, "version": SCHEMA_VERSION, "created_at": dt.datetime.now(dt.UTC).replace(tzinfo=None)}
        try:
            with engine.begin() as conn:
                conn.execute(insert(schema_version_table), [row])
        except IntegrityError:
            pass  # a concurrent opener inserted it between our check and our insert
    _check_version(read_version(engine), url)


def _check_version(version: int | None, url: str) -> None:
    if version is None:
        return  # being created (by us or a concurrent process)
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"results store {url} has schema version {version}, but this monolm understands "
            f"up to version {SCHEMA_VERSION}; upgrade monolm (the store was not modified)"
        )


def migrate(engine: Engine, url: str) -> None:
    """Upgrade an older store to `SCHEMA_VERSION` in place: every step and the new version number
    in one transaction that holds the write lock, so a failure leaves the store as it was, and of
    several processes opening an old store at once the first upgrades it and the others find it
    current. Existing rows keep their values."""
    with _ddl_transaction(engine) as conn:
        version_row = select(schema_version_table.c.version).where(schema_version_table.c.id == 1)
        found = version = conn.execute(version_row.with_for_update()).scalar_one()
        while version < SCHEMA_VERSION:
            if version not in MIGRATIONS:
                raise SchemaVersionError(
                    f"results store {url} has schema version {version} and no migration to "
                    f"version {version + 1} exists (the store was not modified)"
                )
            MIGRATIONS[version](conn)
            version += 1
        if version != found:
            conn.execute(update(schema_version_table).where(schema_version_table.c.id == 1).values(version=version))


@contextmanager
def _ddl_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction that covers schema changes too, committed at the end or rolled back.
    Python's sqlite3 driver begins a transaction only before INSERT/UPDATE/DELETE, so an ALTER
    TABLE would commit on its own: on SQLite the transaction is begun explicitly, and IMMEDIATE
    takes the write lock at once. PostgreSQL's DDL is transactional as it is."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.rollback()
            raise
        conn.commit()
