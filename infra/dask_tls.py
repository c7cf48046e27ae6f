"""TLS for the dask clusters that run the stages: nobody without the key reaches the scheduler.

A dask scheduler runs whatever its clients send. Without TLS, anyone who can open a connection to
its port (every user of a shared login node, on loopback too; anyone on the network when it
listens on all interfaces) can run code inside the flow's process and its workers. With
`require_encryption` and mutual TLS, the scheduler, the workers and the client each present a
certificate signed by a key made for this one cluster; a peer without it fails the handshake.

- `dask-local`: `Security.temporary()`, a key and certificate that exist only in memory; the
  worker processes get them from the cluster, not from a file.
- `slurm`: workers start on other nodes and can only read the key from a file. The same kind of
  key is written into a fresh 0700 folder (files 0600) inside a private folder on the shared
  filesystem (`runner.slurm.tls_directory`, default `<runs_root>/.state/dask-tls`), passed to the
  workers as `--tls-*` paths (never the key itself on a command line or in a job script), and
  removed when the cluster closes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from distributed.security import Security

from monolm.core.private import private_dir

_ROLES = ("client", "scheduler", "worker")


def temporary_security() -> Security:
    """In-memory mutual TLS for a cluster whose workers are this machine's processes."""
    return Security.temporary()  # require_encryption=True


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def file_security(parent: str | Path) -> tuple[Security, Path]:
    """Mutual TLS whose key and certificate are files that workers on other nodes can read: a new
    key in a fresh 0700 folder under the private folder `parent` (created 0700, or checked:
    `UnsafeFolderError` when it is open to others or not ours). Returns the `Security` (file
    paths only) and the folder to remove when the cluster is gone."""
    base = private_dir(parent)
    folder = Path(tempfile.mkdtemp(prefix="cluster-", dir=base))  # mkdtemp: 0700, unpredictable
    try:
        memory = Security.temporary()
        cert, key = folder / "cert.pem", folder / "key.pem"
        _write_private(cert, memory.tls_ca_file)  # self-signed: the certificate is its own CA
        _write_private(key, memory.tls_worker_key)  # one key for every role, as temporary() makes
        paths: dict[str, str] = {"tls_ca_file": str(cert)}
        for role in _ROLES:
            paths[f"tls_{role}_cert"] = str(cert)
            paths[f"tls_{role}_key"] = str(key)
        return Security(require_encryption=True, **paths), folder
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def remove_tls_folder(folder: Path | None) -> None:
    """Delete a cluster's key folder (best effort: a cluster closing must not fail on it)."""
    if folder is not None:
        with contextlib.suppress(OSError):
            shutil.rmtree(folder)
