"""Results store: every run's metrics in one SQL database, queryable across runs.

Why a database and not only the per-stage manifests: the nightly regression check and
`monolm results` ask questions across runs ("the previous quick run's baseline perplexity",
"all mlp_both runs' UAT loss increase"), which is a query, not a directory walk. Why SQLAlchemy
Core: one code path for SQLite (the default, a file under the runs root, nothing to install) and
PostgreSQL or any other backend (a team server), chosen only by the URL. Use a synchronous
driver, e.g. `postgresql+psycopg://user@host/db`.

Modules: `schema` (tables, schema version and migrations), `rows` (validating what callers record),
`results_store` (`ResultsStore`: record and query), `lookup` (a run by ID, name or prefix), `summary`
(what `monolm results` shows by default), `display` (text tables for the terminal).
"""

from monolm.store.display import format_table
from monolm.store.lookup import UnknownRun
from monolm.store.results_store import INSERT_CHUNK, ResultsStore
from monolm.store.rows import METRIC_FIELDS, RUN_FIELDS, RUN_STATUSES
from monolm.store.schema import (
    SCHEMA_VERSION,
    SchemaVersionError,
    metadata,
    metrics_table,
    runs_table,
    schema_version_table,
)

__all__ = [
    "INSERT_CHUNK",
    "METRIC_FIELDS",
    "RUN_FIELDS",
    "RUN_STATUSES",
    "SCHEMA_VERSION",
    "ResultsStore",
    "SchemaVersionError",
    "UnknownRun",
    "format_table",
    "metadata",
    "metrics_table",
    "runs_table",
    "schema_version_table",
]
