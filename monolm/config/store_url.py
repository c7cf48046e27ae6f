"""The results store's URL: its password kept out of everything a run writes, and a store a
cluster can share.

A SQLite store on the `slurm` profile is refused (`check_cluster_store`): stage 7 runs on a
compute node, and SQLite's locking is not reliable on the shared (network) filesystem the runs
live on. Only a one-node SLURM whose jobs share this machine's disk may opt in
(`runner.slurm.allow_sqlite`), and even then not on a network filesystem.

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
from pathlib import Path

from sqlalchemy import URL, make_url
from sqlalchemy.exc import ArgumentError

STORE_PASSWORD_ENV = "MONOLM_STORE_PASSWORD"
# Filesystem types (/proc/self/mounts) shared over a network, where SQLite's locks do not hold.
NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs", "afs"}
NETWORK_FS |= {"panfs", "wekafs", "9p", "fuse.sshfs", "fuse.glusterfs", "fuse.ceph", "fuse.gcsfuse"}
POSTGRES_HINT = (
    "set paths.store_url=postgresql+psycopg://USER@HOST/DB in the site file (a PostgreSQL database every "
    "node reaches; the password from PGPASSFILE or PGPASSWORD, not in the URL)"
)


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


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem `path` (or its nearest existing folder) is on, from the longest
    mount point above it in /proc/self/mounts; None where that cannot be read."""
    probe = path.resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        # Not one literal: code_digest would take an absolute path literal for package data.
        lines = Path("/proc", "self", "mounts").read_text().splitlines()
    except OSError:
        return None
    best, fstype = "", None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = fields[1].replace("\\040", " ")
        inside = str(probe) == mount or str(probe).startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, fstype = mount, fields[2]
    return fstype


def check_cluster_store(profile: str, store_url: str, allow_sqlite: bool) -> None:
    """Refuse a SQLite results store on the `slurm` profile (config validation, before compute),
    naming the PostgreSQL option; the URL itself is never echoed."""
    if profile != "slurm":
        return
    parsed = make_url(store_url)
    if parsed.get_backend_name() != "sqlite":
        return
    if not allow_sqlite:
        raise ValueError(
            "paths.store_url: the slurm profile needs a PostgreSQL results store, not SQLite (stage 7 runs on a "
            f"compute node; SQLite's locking is unreliable on a shared filesystem): {POSTGRES_HINT}. "
            "runner.slurm.allow_sqlite=true is only for a one-node SLURM whose jobs share this machine's disk"
        )
    fstype = filesystem_type(Path(parsed.database or "."))
    if fstype in NETWORK_FS:
        raise ValueError(
            f"paths.store_url: the SQLite file is on a {fstype} network filesystem, where its locking is "
            f"unreliable; {POSTGRES_HINT}"
        )
