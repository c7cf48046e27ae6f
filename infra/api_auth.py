"""The auth string of the Prefect server that `make serve` started, for this project's own clients.

`infra/server/prefect-server.sh` generates `<state>/prefect/auth` (mode 600) and starts the server
with it; every client must send it (`PREFECT_API_AUTH_STRING`). The shell scripts export it for
the worker, its flow runs and their SLURM jobs; `monolm runs`, `python -m deployments.crashed`
and `python -m deployments.serve` call `use_served_auth` before they import Prefect (whose
settings are read once, at import). It is sent only to the server of this state dir: a
`PREFECT_API_URL` that points elsewhere never gets our secret. No Prefect import here."""

from __future__ import annotations

import os
from pathlib import Path

ENV = "PREFECT_API_AUTH_STRING"


def state_dir() -> Path:
    return Path(os.environ.get("MONOLM_STATE_DIR") or Path(__file__).resolve().parent.parent / ".state")


def served_auth(url: str | None, state: Path | None = None) -> str | None:
    """The auth string of the server started from `state`, when `url` is that server's API."""
    home = (state or state_dir()) / "prefect"
    try:
        if url is None or (home / "api_url").read_text().strip() != url.rstrip("/"):
            return None
        return (home / "auth").read_text().strip() or None
    except OSError:
        return None


def use_served_auth(url: str | None = None, state: Path | None = None) -> bool:
    """Put the served auth string in the environment (unless one is set) when `url` (default
    `PREFECT_API_URL`) is our server. Call before the first Prefect import. True when set now."""
    if os.environ.get(ENV):
        return False
    auth = served_auth(url or os.environ.get("PREFECT_API_URL"), state)
    if auth:
        os.environ[ENV] = auth
    return bool(auth)
