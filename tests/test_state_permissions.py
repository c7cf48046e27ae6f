"""The state folder, the Prefect database and everything the infra scripts write are the user's
only (issue 21): `umask 077` in every infra script, `.state/` created 0700 (an existing one loses
group/other read and write), the CLI's run history (PREFECT_HOME, its SQLite database) 0700/0600."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.security

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (REPO / "infra").rglob("*.sh") if p.name != "lib.sh")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def lib(script: str, state: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", f"set -euo pipefail; umask 022; source infra/lib.sh; {script}"],
        cwd=REPO,
        env={**os.environ, "MONOLM_STATE_DIR": str(state)},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_infra_lib_sets_umask_077(tmp_path):
    assert lib("umask", tmp_path / "state").stdout.strip() == "0077"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_infra_script_sources_the_lib_before_it_writes(script):
    lines = [line.strip() for line in script.read_text().splitlines()]
    sourced = next(i for i, line in enumerate(lines) if line.startswith("source ") and "lib.sh" in line)
    assert not any(">" in line or "mkdir" in line for line in lines[:sourced] if not line.startswith("#"))


def test_state_dir_is_created_private_with_private_files(tmp_path):
    state = tmp_path / "state"
    proc = lib(f'lock_component "{state}/prefect"; echo x > "{state}/prefect/server.log"', state)
    assert proc.returncode == 0, proc.stderr
    assert mode(state) == 0o700 and mode(state / "prefect") == 0o700
    assert mode(state / "prefect" / "server.log") == 0o600 and mode(state / "prefect" / ".lock") == 0o600


def test_existing_open_state_dir_loses_read_and_write_for_others(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    proc = lib(f'lock_component "{state}/worker"', state)
    assert proc.returncode == 0, proc.stderr
    assert mode(state) == 0o711  # search stays: PostgreSQL as root reaches its folder through it


def quiet_defaults(monkeypatch) -> None:
    """prefect_environment() sets these with setdefault: set them here so the test restores them."""
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def test_cli_run_history_and_prefect_database_are_private(tmp_path, monkeypatch):
    from flows.cli import prefect_environment

    old = tmp_path / ".state" / "prefect"
    old.mkdir(parents=True)
    (tmp_path / ".state").chmod(0o755)
    old.chmod(0o755)
    db = old / "prefect.db"
    db.write_bytes(b"")
    db.chmod(0o644)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PREFECT_HOME", raising=False)
    quiet_defaults(monkeypatch)
    prefect_environment()
    assert os.environ["PREFECT_HOME"] == str(old.resolve())
    assert mode(tmp_path / ".state") & 0o066 == 0
    assert mode(old) == 0o700 and mode(db) == 0o600


def test_cli_creates_a_fresh_state_dir_0700(tmp_path, monkeypatch):
    from flows.cli import prefect_environment

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PREFECT_HOME", raising=False)
    quiet_defaults(monkeypatch)
    prefect_environment()
    assert mode(tmp_path / ".state") == 0o700 and mode(tmp_path / ".state" / "prefect") == 0o700
