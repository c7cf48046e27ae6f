"""Keeping the results store's password out of everything a run writes.

A password in `paths.store_url` would otherwise travel with the config into flow parameters,
`config.yaml`, manifests and log lines. When the config is built, the password is taken out of the
URL and put in the process environment (`MONOLM_STORE_PASSWORD`, inherited by local workers and,
with sbatch's default `--export=ALL`, by SLURM jobs); `ResultsStore` puts it back only when it
connects. Better still, give no password in the URL at all: PostgreSQL's driver reads
`PGPASSWORD` or `PGPASSFILE` (a 0600 `~/.pgpass`) itself, and `MONOLM_STORE_PASSWORD` works for
any backend.
"""

from __future__ import annotations

import os

from sqlalchemy import URL, make_url
from sqlalchemy.exc import ArgumentError

STORE_PASSWORD_ENV = "MONOLM_STORE_PASSWORD"


def without_password(url: str) -> str:
    """`url` without its password, which moves to `MONOLM_STORE_PASSWORD`; the error for a URL
    that does not parse names the field, not the value (it may hold the password)."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise ValueError(
            "paths.store_url: not a SQLAlchemy URL (e.g. postgresql+psycopg://user@host/db or sqlite:///path)"
        ) from None
    if parsed.password is None:
        return url
    os.environ[STORE_PASSWORD_ENV] = str(parsed.password)
    return parsed._replace(password=None).render_as_string(hide_password=False)  # set() ignores None


def connect_url(url: str | URL) -> URL:
    """The URL to connect with: a password missing from it comes from `MONOLM_STORE_PASSWORD`
    (SQLite has none)."""
    parsed = make_url(url)
    password = os.environ.get(STORE_PASSWORD_ENV)
    if parsed.password is None and password and parsed.get_backend_name() != "sqlite":
        parsed = parsed.set(password=password)
    return parsed
