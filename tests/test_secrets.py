"""No secrets in logs (issue 21): a password in `paths.store_url` is taken out of the config when
it is built, so no log line, flow parameter, config.yaml, manifest or store row of a run holds it;
the store still connects with it (from the environment)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from helpers import micro_sets  # noqa: E402
from test_report import NUMBERS, make_cfg, make_seed  # noqa: E402

from monolm.config import config_to_yaml, load_config  # noqa: E402
from monolm.config.store_url import STORE_PASSWORD_ENV, connect_url  # noqa: E402
from monolm.report import publish  # noqa: E402
from monolm.report import stage as aggregate  # noqa: E402
from monolm.store import ResultsStore  # noqa: E402

pytestmark = pytest.mark.security
REPO = Path(__file__).resolve().parents[1]


def _planted() -> str:
    return "planted" + "Secret" + uuid.uuid4().hex[:12]  # built at run time: no token-like literal


def _url(secret: str) -> str:
    return f"postgresql+psycopg://monolm:{secret}@127.0.0.1:9/monolm"


def _files_holding(root: Path, secret: str) -> list[str]:
    needle = secret.encode()
    return [str(p) for p in root.rglob("*") if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]


def test_the_config_keeps_no_password_but_the_store_gets_it(monkeypatch):
    monkeypatch.setenv(STORE_PASSWORD_ENV, "")
    secret = _planted()
    cfg = load_config("tiny", sets=[f"paths.store_url={_url(secret)}"])
    assert secret not in cfg.model_dump_json() and secret not in config_to_yaml(cfg)
    from flows.experiment import _config_as_sets  # what `monolm run` passes to the flow as parameters

    assert not [s for s in _config_as_sets(cfg) if secret in s]
    assert connect_url(cfg.store_url).password == secret  # put back only to connect
    assert os.environ[STORE_PASSWORD_ENV] == secret  # inherited by workers and SLURM jobs


def test_stage_7_logs_and_writes_no_password(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(STORE_PASSWORD_ENV, "")
    secret = _planted()
    cfg = make_cfg(
        tmp_path, [42], paths={**make_cfg(tmp_path, [42]).paths.model_dump(mode="json"), "store_url": _url(secret)}
    )
    refs = make_seed(cfg, 42, NUMBERS[42])
    sqlite = f"sqlite:///{tmp_path / 'runs' / 'results.sqlite'}"
    reached: list[str | None] = []

    def store(url: str) -> ResultsStore:  # no PostgreSQL here: the same rows go to SQLite
        reached.append(connect_url(url).password)
        return ResultsStore(sqlite)

    monkeypatch.setattr(publish, "ResultsStore", store)
    with caplog.at_level(logging.DEBUG):
        result = aggregate.run(cfg, [refs])
    assert reached == [secret]  # the store would have connected with it
    assert secret not in caplog.text and secret not in repr(result)
    assert _files_holding(tmp_path, secret) == []  # config.yaml, manifest, report, store file


@pytest.mark.slow
def test_a_tiny_run_writes_and_prints_no_password(tmp_path):
    secret = _planted()
    sets = [a for s in micro_sets(tmp_path, f"paths.store_url={_url(secret)}") for a in ("--set", s)]
    env = {**os.environ, "PYTHONPATH": str(REPO), STORE_PASSWORD_ENV: ""}
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--no-prefect", "-q", *sets],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert secret not in out.stdout and secret not in out.stderr
    assert _files_holding(tmp_path, secret) == []  # stage folders, manifests, logs, caches


# --------------------------------------------------------------------------- SQLite on a cluster
def test_the_slurm_profile_refuses_a_sqlite_store_before_any_compute(tmp_path, monkeypatch):
    from monolm.config import ConfigError
    from monolm.config import store_url as urls

    for sets in (["runner.profile=slurm"], ["runner.profile=slurm", f"paths.store_url=sqlite:///{tmp_path}/r.db"]):
        with pytest.raises(ConfigError, match="paths.store_url: the slurm profile needs a PostgreSQL results store"):
            load_config("tiny", sets=sets)
    assert not (tmp_path / "r.db").exists()
    cfg = load_config("tiny", sets=["runner.profile=slurm", "paths.store_url=postgresql+psycopg://monolm@db/monolm"])
    assert cfg.runner.profile == "slurm"
    one_node = ["runner.profile=slurm", "runner.slurm.allow_sqlite=true", f"paths.runs_root={tmp_path}"]
    assert load_config("tiny", sets=one_node).store_url.startswith("sqlite")  # the one-node SLURM's opt-in
    monkeypatch.setattr(urls, "filesystem_type", lambda path: "nfs4")  # ... but never on a network filesystem
    with pytest.raises(ConfigError, match="paths.store_url: the SQLite file is on a nfs4 network filesystem"):
        load_config("tiny", sets=one_node)
    assert load_config("tiny", sets=[f"paths.runs_root={tmp_path}"]).runner.profile == "local"  # local: SQLite is fine


def test_filesystem_type_reads_the_mount_table():
    from monolm.config.store_url import filesystem_type

    assert filesystem_type(Path("/proc/self/status")) == "proc"
    assert filesystem_type(Path("/proc/no/such/file")) == "proc"  # its nearest existing folder's
