"""Locks and sockets outside the project's folders live in a per-user 0700 scratch folder, checked
(owner, mode, not a link) before every reuse and refused otherwise (issue 21): a predictable name in
the shared /tmp could be created first by another user of the login node."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from monolm.core.private import SCRATCH_ENV, UnsafeFolderError, private_dir, private_scratch
from monolm.study.sequential import folder_lock

pytestmark = pytest.mark.security

REPO = Path(__file__).resolve().parents[1]
LONG = "/" + "/".join(["a-rather-long-state-folder"] * 5)  # > 100 bytes: its socket goes to scratch


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_stage_lock_is_taken_in_a_fresh_private_scratch(tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    monkeypatch.setenv(SCRATCH_ENV, str(scratch))
    with folder_lock(tmp_path / "runs" / "setup", "stage setup"):
        locks = list(scratch.glob("stage-*.lock"))
        assert len(locks) == 1 and mode(locks[0]) == 0o600
    assert mode(scratch) == 0o700
    assert not (tmp_path / "runs").exists()  # nothing in the runs root


def test_default_scratch_is_per_user_and_private(tmp_path, monkeypatch):
    monkeypatch.delenv(SCRATCH_ENV, raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    assert private_scratch() == tmp_path / f"monolm-{os.getuid()}"
    assert mode(tmp_path / f"monolm-{os.getuid()}") == 0o700


def test_scratch_of_wrong_mode_is_refused_and_left_alone(tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    os.chmod(scratch, 0o755)
    monkeypatch.setenv(SCRATCH_ENV, str(scratch))
    lock = folder_lock(tmp_path / "runs" / "setup", "stage setup")
    with pytest.raises(UnsafeFolderError, match="mode 0755, open to other users: it must be 0700"), lock:
        pytest.fail("the lock was taken in an open folder")
    assert list(scratch.iterdir()) == [] and mode(scratch) == 0o755  # not repaired, not used


def test_scratch_that_is_a_link_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    private_dir(target)
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(UnsafeFolderError, match="is a link or a file"):
        private_dir(tmp_path / "link")


@pytest.mark.skipif(os.getuid() != 0, reason="giving a folder to another user needs root")
def test_scratch_owned_by_another_user_is_refused(tmp_path):
    scratch = private_dir(tmp_path / "scratch")
    os.chown(scratch, 65534, 65534)
    with pytest.raises(UnsafeFolderError, match="belongs to user id 65534"):
        private_dir(scratch)


def lib(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run bash `script` with infra/lib.sh sourced."""
    return subprocess.run(
        ["bash", "-c", f"set -euo pipefail; source infra/lib.sh; {script}"],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_infra_socket_folder_for_a_long_path_is_in_the_private_scratch(tmp_path):
    scratch = tmp_path / "scratch"
    env = {SCRATCH_ENV: str(scratch)}
    short = lib(f"socket_dir {tmp_path}/run 16", env)
    assert short.stdout.strip() == f"{tmp_path}/run"  # fits: stays where it is
    proc = lib(f'd="$(socket_dir {LONG}/run 16)"; prepare_socket_dir "$d" {LONG}/run; echo "$d"', env)
    assert proc.returncode == 0, proc.stderr
    sock = Path(proc.stdout.strip())
    assert sock.parent == scratch and sock.is_dir() and mode(scratch) == 0o700


def test_infra_scripts_refuse_a_scratch_folder_of_wrong_mode(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    os.chmod(scratch, 0o775)
    proc = lib(f'prepare_socket_dir "$(socket_dir {LONG}/run 16)" {LONG}/run', {SCRATCH_ENV: str(scratch)})
    assert proc.returncode != 0
    assert f"private folder {scratch} has mode 775, open to other users: it must be 700" in proc.stderr
    assert list(scratch.iterdir()) == []
