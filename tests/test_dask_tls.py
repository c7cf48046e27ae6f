"""The dask clusters of the `dask-local` and `slurm` profiles accept only peers holding their key
(issue 21): a client that knows the port but not the key cannot connect, the key of the `slurm`
cluster lives in a private folder that worker jobs read by path, and no dashboard listens."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from distributed import Client
from distributed.security import Security

from infra.profiles import local_cluster_kwargs, slurm_cluster_kwargs, tls_directory
from monolm.config import load_config
from monolm.core.private import UnsafeFolderError

pytestmark = pytest.mark.security

REPO = Path(__file__).resolve().parents[1]
SITE = REPO / "infra" / "site-a100.example.yaml"


def refused(address: str, security: Security | None = None) -> bool:
    """Whether a client fails to connect to `address` (it must, within a few seconds)."""
    try:
        with Client(address, timeout="3s", security=security):
            return False
    except (OSError, TimeoutError):
        return True


def raw_tls_refused(address: str) -> bool:
    """A stranger's own TLS client, verifying nothing and showing no certificate: the scheduler
    ends the handshake (or the first read) instead of talking to it."""
    host, port = address.split("://", 1)[1].rsplit(":", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, int(port)), timeout=5) as raw, ctx.wrap_socket(raw) as tls:
            tls.sendall(b"\x00" * 8)
            return tls.recv(1) == b""
    except (OSError, ssl.SSLError):
        return True


def assert_no_dashboard(scheduler) -> None:
    """The scheduler's HTTP server (dask always starts one) listens on loopback only and serves
    its health check, not the dashboard."""
    hosts = {sock.getsockname()[0] for sock in scheduler.http_server._sockets.values()}
    assert hosts == {"127.0.0.1"}
    base = f"http://127.0.0.1:{scheduler.http_server.port}"
    assert urllib.request.urlopen(f"{base}/health", timeout=10).status == 200
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{base}/status", timeout=10)
    assert err.value.code == 404


def assert_only_key_holders_connect(address: str, security: Security) -> None:
    host_port = address.split("://", 1)[1]
    assert address.startswith("tls://")
    assert refused(f"tcp://{host_port}")  # plain TCP to the same port
    assert raw_tls_refused(address)  # TLS without a client certificate
    assert refused(address, Security.temporary())  # the key of another cluster
    with Client(address, security=security, timeout="10s") as client:
        assert client.submit(lambda x: x + 1, 1).result(timeout=30) == 2


def test_dask_local_cluster_refuses_a_client_without_its_certificate(monkeypatch):
    from distributed import LocalCluster

    cfg = load_config("tiny", sets=["runner.profile=dask-local", "runner.dask_workers=1"])
    kwargs = local_cluster_kwargs(cfg)
    with LocalCluster(**kwargs) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tls://127.0.0.1:")
        assert_no_dashboard(cluster.scheduler)
        assert_only_key_holders_connect(address, kwargs["security"])


def test_slurm_cluster_key_is_a_private_file_that_workers_read_by_path(tmp_path):
    from infra.slurm_runner import WatchedSLURMCluster

    slurm = load_config("full", config_file=SITE, sets=["runner.slurm.interface=lo"]).runner.slurm
    parent = tmp_path / "shared" / "dask-tls"
    logs = tmp_path / "state" / "logs"
    kwargs = {**slurm_cluster_kwargs(slurm, "http://api.test/api"), "log_directory": str(logs)}
    with WatchedSLURMCluster(**kwargs, tls_directory=str(parent)) as cluster:
        # Worker logs too are private: dask-jobqueue would have created them with the umask.
        assert stat.S_IMODE(logs.parent.stat().st_mode) == 0o700 and stat.S_IMODE(logs.stat().st_mode) == 0o700
        folder = cluster.tls_folder
        assert folder is not None and folder.parent == parent
        assert stat.S_IMODE(parent.stat().st_mode) == 0o700 and stat.S_IMODE(folder.stat().st_mode) == 0o700
        for f in folder.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o600
        script = cluster.job_script()
        key = str(folder / "key.pem")
        assert f"--tls-key {key}" in script and f"--tls-ca-file {folder / 'cert.pem'}" in script
        assert "PRIVATE KEY" not in script
        assert "--interface lo" in script
        assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
        assert_no_dashboard(cluster.scheduler)
        assert raw_tls_refused(cluster.scheduler_address)
        assert refused(cluster.scheduler_address, Security.temporary())
        with Client(cluster.scheduler_address, security=cluster.security, timeout="10s") as client:
            assert client.scheduler_info()["address"] == cluster.scheduler_address
    assert not folder.exists()  # the key goes with the cluster
    assert parent.is_dir()


def test_slurm_tls_folder_open_to_others_is_refused(tmp_path):
    from infra.slurm_runner import WatchedSLURMCluster

    slurm = load_config("full", config_file=SITE).runner.slurm
    parent = tmp_path / "dask-tls"
    parent.mkdir(mode=0o755)
    os.chmod(parent, 0o755)
    with pytest.raises(UnsafeFolderError, match="0755"):
        WatchedSLURMCluster(**slurm_cluster_kwargs(slurm, "http://api.test/api"), tls_directory=str(parent))
    assert list(parent.iterdir()) == []


def test_slurm_tls_directory_defaults_to_the_runs_roots_state_folder(tmp_path):
    cfg = load_config("tiny", sets=[f"paths.runs_root={tmp_path / 'runs'}"])
    assert Path(tls_directory(cfg)) == (tmp_path / "runs" / ".state" / "dask-tls").resolve()
    assert not (tmp_path / "runs").exists()  # made by the cluster when it starts, not by the config
