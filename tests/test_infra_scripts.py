"""The infra/ scripts, for real: a Prefect server on loopback (SQLite and PostgreSQL), a worker,
`serve.sh up/down`, and a local SLURM with fake A100s. Each test uses its own state directory and
checks that stopping leaves none of the processes it started."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
SCRIPTS = {
    "infra/server/prefect-server.sh": ["start", "stop", "status", "url"],
    "infra/postgres/postgres.sh": ["install", "start", "stop", "status", "url"],
    "infra/worker.sh": ["start", "stop", "status"],
    "infra/serve.sh": ["up", "down", "status", "nightly"],
    "infra/slurm/local-slurm.sh": ["install", "start", "stop", "status", "env"],
    "infra/free-port.sh": [],
}
ALL_SHELL = sorted(str(p.relative_to(REPO)) for p in INFRA.rglob("*.sh"))


# ----------------------------------------------------------------------------- helpers
def _env(state: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SLURM_"))}
    env["MONOLM_STATE_DIR"] = str(state)
    return env


def run(script: str, *args: str, state: Path, timeout: float = 180, check: bool = True):
    proc = subprocess.run([str(REPO / script), *args], env=_env(state), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{script} {' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return proc


def start_time(pid: int) -> str | None:
    """Kernel start time of a live (non-zombie) process, else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def recorded(pid_file: Path) -> tuple[int, str]:
    pid = int(pid_file.read_text())
    start = (pid_file.parent / (pid_file.name + ".start")).read_text().strip()
    assert start_time(pid) == start, f"{pid_file} does not describe a running process"
    return pid, start


def group_members(pgid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            rest = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if rest[0] not in ("Z", "X") and int(rest[2]) == pgid:
            out.append(int(d.name))
    return out


def assert_gone(pid: int, start: str) -> None:
    assert start_time(pid) != start, f"process {pid} is still running"
    assert group_members(pid) == [], f"processes {group_members(pid)} of group {pid} still running"


def listeners(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of sockets listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.append(addr)
    return found


def http_json(url: str, data: bytes | None = None, headers: dict[str, str] | None = None):
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def api_json(state: Path, api: str, path: str, data: bytes | None = None):
    """An API call as the scripts make it: the auth string from <state>/prefect/auth and, for a
    POST, a CSRF token fetched for this client."""
    import base64

    auth = base64.b64encode((state / "prefect/auth").read_bytes().strip()).decode()
    headers = {"Authorization": f"Basic {auth}"}
    if data is not None:
        token = http_json(f"{api}/csrf-token?client=infra-test", headers=headers)["token"]
        headers |= {"Prefect-Csrf-Token": token, "Prefect-Csrf-Client": "infra-test"}
    return http_json(f"{api}{path}", data, headers)


def http_status(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> int:
    try:
        http_json(url, data, headers)
    except urllib.error.HTTPError as exc:
        return exc.code
    return 200


def free_port(state: Path) -> int:
    return int(run("infra/free-port.sh", state=state).stdout.strip())


@pytest.fixture
def state():
    """A state dir other users can traverse: PostgreSQL runs as the `postgres` system user."""
    path = Path(tempfile.mkdtemp(prefix="monolm-infra-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def require_prefect() -> None:
    if not (REPO / ".venv/bin/prefect").exists() and shutil.which("prefect") is None:
        pytest.skip("the prefect CLI is not installed (run `make install`)")
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (apt-get install -y curl); the scripts use it for health checks")


def install_or_skip(script: str, state: Path, what: str) -> None:
    """Install through the script itself (apt-get, as root on CI); skip only if impossible."""
    proc = run(script, "install", state=state, timeout=900, check=False)
    if proc.returncode != 0:
        pytest.skip(f"{what} is not installed and could not be installed here: {proc.stderr.strip()[-500:]}")


# ----------------------------------------------------------------------------- static checks
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_exits_zero_and_names_commands(script, tmp_path):
    state = tmp_path / "state"
    proc = subprocess.run([str(REPO / script), "--help"], capture_output=True, text=True, env=_env(state), timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: " + script)
    for command in SCRIPTS[script]:
        assert f"\n  {command} " in proc.stdout, f"--help of {script} does not describe '{command}'"
    assert not state.exists(), "--help must not create state"


@pytest.mark.parametrize("script", sorted(s for s, commands in SCRIPTS.items() if "stop" in commands))
def test_status_and_stop_of_nothing_are_harmless(script, tmp_path):
    """On a fresh state dir: status says stopped (exit 3), stop succeeds, neither creates state."""
    state = tmp_path / "state"
    status = subprocess.run([str(REPO / script), "status"], capture_output=True, text=True, env=_env(state), timeout=30)
    assert status.returncode == 3, status.stdout + status.stderr
    assert "stopped" in status.stdout
    stop = subprocess.run([str(REPO / script), "stop"], capture_output=True, text=True, env=_env(state), timeout=30)
    assert stop.returncode == 0, stop.stderr
    assert "not running" in stop.stderr
    assert not state.exists()


@pytest.mark.parametrize("script", sorted(s for s, commands in SCRIPTS.items() if commands))
def test_unknown_command_fails_with_message(script, tmp_path):
    proc = subprocess.run(
        [str(REPO / script), "frobnicate"], capture_output=True, text=True, env=_env(tmp_path), timeout=30
    )
    assert proc.returncode != 0
    assert "unknown command: frobnicate" in proc.stderr


@pytest.mark.parametrize("script", ALL_SHELL)
def test_bash_syntax_and_strict_mode(script):
    path = REPO / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    if path.name != "lib.sh":
        assert "set -euo pipefail" in path.read_text()
        assert os.access(path, os.X_OK), f"{script} is not executable"
    assert "pkill" not in path.read_text() and "killall" not in path.read_text()


def test_serve_says_how_it_deploys_the_nightly_schedule(tmp_path):
    """`make serve` on a laptop: the nightly quick run (a Pythia-1.4B download) is deployed
    inactive and the output says how to switch it on; with MONOLM_NIGHTLY=on, active and how to
    pause it. (`up` prints the same lines after deploying.)"""
    env = {k: v for k, v in _env(tmp_path).items() if not k.startswith("MONOLM_NIGHTLY")}
    off = subprocess.run([str(REPO / "infra/serve.sh"), "nightly"], env=env, capture_output=True, text=True)
    assert off.returncode == 0 and "inactive" in off.stdout and "Pythia-1.4B" in off.stdout
    assert "MONOLM_NIGHTLY=on make serve" in off.stdout and "cron '0 2 * * *' UTC" in off.stdout
    on = subprocess.run(
        [str(REPO / "infra/serve.sh"), "nightly"],
        env={**env, "MONOLM_NIGHTLY": "on", "MONOLM_NIGHTLY_TZ": "Asia/Tokyo"},
        capture_output=True,
        text=True,
    )
    assert on.returncode == 0 and "ACTIVE" in on.stdout and "Asia/Tokyo" in on.stdout
    assert "deployment schedule pause --all" in on.stdout


def test_site_example_loads_as_slurm_a100_config():
    from monolm.config import load_config

    cfg = load_config("full", config_file=INFRA / "site-a100.example.yaml")
    slurm = cfg.runner.slurm
    assert cfg.runner.profile == "slurm"
    assert slurm.gpu_type == "a100" and slurm.gpus_per_job == 1
    assert slurm.partition and slurm.account and slurm.qos
    assert slurm.walltime == "24:00:00"
    assert any(line.startswith("module load") for line in slurm.prologue)
    assert any("/.venv/bin/activate" in line for line in slurm.prologue)
    assert any(line.startswith("export PREFECT_API_URL=http") for line in slurm.prologue)
    # The profile adds the GPU request itself; a second --gres would conflict.
    assert not any(d.startswith("--gres") for d in slurm.job_extra_directives)


# ----------------------------------------------------------------------------- lib.sh stop logic
STUBBORN = r"""
import os, signal, subprocess, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"],
    start_new_session=True)   # like a Prefect flow-run process: its own session
print(child.pid, flush=True)
time.sleep(600)
"""


def test_stop_escalates_and_takes_children_in_other_sessions(tmp_path):
    """A process that ignores SIGINT/SIGTERM (like `prefect worker start`) and a child it moved to
    its own session (like a flow run) are both gone after stop_recorded."""
    out = tmp_path / "stubborn.out"
    (tmp_path / "stubborn.py").write_text(STUBBORN)
    script = f"""
        set -euo pipefail
        source {INFRA}/lib.sh
        pid=$(start_group {tmp_path}/s.pid {out} {sys.executable} {tmp_path}/stubborn.py)
        for i in $(seq 100); do [[ -s {out} ]] && break; sleep 0.05; done
        echo "$pid $(cat {out})"
    """
    pid, child = map(
        int,
        subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True, timeout=30).stdout.split(),
    )
    pid_start, child_start = start_time(pid), start_time(child)
    assert pid_start and child_start
    try:
        proc = subprocess.run(
            ["bash", "-c", f"source {INFRA}/lib.sh; stop_recorded {tmp_path}/s.pid stubborn INT:1 TERM:1 KILL:5"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 0, proc.stderr
        assert "SIGKILL" in proc.stderr  # it took the last resort
        assert start_time(pid) != pid_start and start_time(child) != child_start
        assert not (tmp_path / "s.pid").exists()
    finally:
        for p in (pid, child):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)


def test_stop_never_signals_a_recycled_pid(tmp_path):
    """A PID file whose process is gone and whose number now belongs to someone else (here: this
    test process, with a different start time) is treated as stale, not killed."""
    (tmp_path / "x.pid").write_text(f"{os.getpid()}\n")
    (tmp_path / "x.pid.start").write_text("1\n")
    proc = subprocess.run(
        ["bash", "-c", f"source {INFRA}/lib.sh; stop_recorded {tmp_path}/x.pid x TERM:1 KILL:1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0 and "x is not running" in proc.stderr
    assert not (tmp_path / "x.pid").exists()


# ----------------------------------------------------------------------------- Prefect server
@pytest.mark.service
@pytest.mark.timeout(300)
def test_prefect_server_sqlite_on_loopback(state):
    require_prefect()
    port = free_port(state)
    script = "infra/server/prefect-server.sh"
    try:
        t0 = time.monotonic()
        url = run(script, "start", "--port", str(port), state=state).stdout.strip()
        startup = time.monotonic() - t0
        assert url == f"http://127.0.0.1:{port}/api"
        assert (state / "prefect/api_url").read_text().strip() == url
        assert http_json(f"{url}/health") is True
        # Bound to loopback only: every listening socket on the port is 127.0.0.1.
        assert listeners(port) and set(listeners(port)) == {"0100007F"}, listeners(port)
        # A project-local SQLite database under PREFECT_HOME=<state>/prefect.
        assert (state / "prefect/prefect.db").exists()
        # Private (umask 077 in the scripts): the database and its folder are this user's only.
        assert stat.S_IMODE((state / "prefect/prefect.db").stat().st_mode) & 0o077 == 0
        assert stat.S_IMODE((state / "prefect").stat().st_mode) == 0o700
        pid, start = recorded(state / "prefect/server.pid")
        # Idempotent: a second start reuses the running server.
        assert run(script, "start", state=state).stdout.strip() == url
        assert recorded(state / "prefect/server.pid") == (pid, start)
        assert "running" in run(script, "status", state=state).stdout
        print(f"Prefect server (SQLite) ready in {startup:.1f} s")
    finally:
        run(script, "stop", state=state, check=False)
    assert_gone(pid, start)
    assert listeners(port) == []
    assert not (state / "prefect/api_url").exists()
    assert run(script, "status", state=state, check=False).returncode == 3


@pytest.mark.service
@pytest.mark.security
@pytest.mark.timeout(300)
def test_serve_up_down_starts_and_stops_server_and_worker(state):
    """`serve.sh up` brings up server + work pool + worker; `down` stops exactly those. The API
    requires the generated auth string (mode 600) and a CSRF token; the worker, whose requests
    need both, came online without the auth string in its environment or arguments."""
    import base64

    require_prefect()
    port = free_port(state)
    try:
        proc = run("infra/serve.sh", "up", "--port", str(port), "--no-deploy", state=state)
        assert f"Prefect UI:  http://127.0.0.1:{port}" in proc.stdout
        assert (state / "serve/started").read_text().split() == ["server", "worker:local"]
        api = f"http://127.0.0.1:{port}/api"
        pools = {p["name"]: p["type"] for p in api_json(state, api, "/work_pools/filter", b"{}")}
        assert pools.get("local") == "process"
        workers = api_json(state, api, "/work_pools/local/workers/filter", b"{}")
        assert [w["status"] for w in workers] == ["ONLINE"]
        # Authentication by default: no auth string, a wrong one, or no CSRF token: refused.
        auth = (state / "prefect/auth").read_text().strip()
        assert (state / "prefect/auth").stat().st_mode & 0o777 == 0o600
        assert http_status(f"{api}/work_pools/filter", b"{}") in (401, 403)  # CSRF is checked first
        assert http_status(f"{api}/work_pools/local") == 401
        wrong = base64.b64encode(b"monolm:" + b"0" * 48).decode()
        assert http_status(f"{api}/work_pools/local", headers={"Authorization": f"Basic {wrong}"}) == 401
        right = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}
        assert http_status(f"{api}/work_pools/filter", b"{}", right) == 403  # no CSRF token
        # CORS admits the UI's own origin only.
        for origin, status in ((f"http://127.0.0.1:{port}", 200), ("http://evil.example", 400)):
            preflight = {"Origin": origin, "Access-Control-Request-Method": "POST"}
            req = urllib.request.Request(f"{api}/work_pools/filter", method="OPTIONS", headers=preflight)
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    assert resp.status == status, origin
            except urllib.error.HTTPError as exc:
                assert exc.code == status, origin
        # Never on a command line: no process shows the auth string in its arguments.
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert auth.split(":", 1)[1] not in ps
        server = recorded(state / "prefect/server.pid")
        worker = recorded(state / "worker/local.pid")
        # Running `up` again changes nothing and still knows what it started.
        run("infra/serve.sh", "up", "--no-deploy", state=state)
        assert recorded(state / "worker/local.pid") == worker
        assert (state / "serve/started").read_text().split() == ["server", "worker:local"]
    finally:
        down = run("infra/serve.sh", "down", state=state, check=False)
    assert down.returncode == 0, down.stderr
    # Reverse order: the worker was stopped before the server.
    assert down.stderr.index("worker (pool local) stopped") < down.stderr.index("Prefect server stopped")
    assert_gone(*worker)
    assert_gone(*server)
    assert not (state / "serve/started").exists()


@pytest.mark.security
@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3"])
def test_non_loopback_bind_without_auth_is_refused(state, host):
    """MONOLM_API_AUTH=off (an unauthenticated API) is for loopback only: nothing starts."""
    env = {**_env(state), "MONOLM_API_AUTH": "off"}
    proc = subprocess.run(
        [str(REPO / "infra/server/prefect-server.sh"), "start", "--host", host],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert f"refusing to bind {host} without authentication" in proc.stderr
    assert not (state / "prefect/server.pid").exists()


@pytest.mark.service
@pytest.mark.timeout(120)
def test_worker_refuses_without_server(state):
    require_prefect()
    proc = run("infra/worker.sh", "start", "--no-deploy", state=state, check=False)
    assert proc.returncode != 0
    assert "no Prefect API" in proc.stderr


# ----------------------------------------------------------------------------- PostgreSQL
@pytest.mark.postgres
@pytest.mark.timeout(900)
def test_postgres_cluster_and_prefect_server_on_it(state):
    install_or_skip("infra/postgres/postgres.sh", state, "PostgreSQL")
    require_prefect()
    pg = "infra/postgres/postgres.sh"
    try:
        run(pg, "start", state=state)
        url = run(pg, "url", state=state).stdout.strip()
        port = int((state / "postgres/port").read_text())
        assert url.startswith("postgresql+asyncpg://prefect:") and url.endswith(f"@127.0.0.1:{port}/prefect")
        pw_file = state / "postgres/password"
        assert pw_file.stat().st_mode & 0o777 == 0o600
        assert pw_file.read_text().strip() in url
        assert set(listeners(port)) == {"0100007F"}, listeners(port)
        pg_pid = recorded(state / "postgres/postgres.pid")
        run(pg, "start", state=state)  # idempotent
        assert recorded(state / "postgres/postgres.pid") == pg_pid

        import asyncpg

        async def query(dsn: str):
            conn = await asyncpg.connect(dsn)
            try:
                one = await conn.fetchval("SELECT 1")
                trgm = await conn.fetchval("SELECT extname FROM pg_extension WHERE extname = 'pg_trgm'")
                sim = await conn.fetchval("SELECT similarity('monotonic', 'monotone')")
                return one, trgm, sim
            finally:
                await conn.close()

        dsn = url.replace("postgresql+asyncpg://", "postgresql://")
        one, trgm, sim = asyncio.run(query(dsn))
        assert (one, trgm) == (1, "pg_trgm") and 0 < sim < 1
        with pytest.raises(Exception, match="password authentication failed"):
            asyncio.run(query(dsn.replace(pw_file.read_text().strip(), "wrong")))

        # The Prefect server on this database: its schema lands in PostgreSQL, not SQLite.
        srv = "infra/server/prefect-server.sh"
        sport = free_port(state)
        api = run(srv, "start", "--port", str(sport), "--db", "postgres", state=state).stdout.strip()
        assert http_json(f"{api}/health") is True
        assert not (state / "prefect/prefect.db").exists()

        async def tables(dsn: str) -> set[str]:
            conn = await asyncpg.connect(dsn)
            try:
                rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
                return {r["tablename"] for r in rows}
            finally:
                await conn.close()

        assert {"flow_run", "deployment", "work_pool"} <= asyncio.run(tables(dsn))
        server = recorded(state / "prefect/server.pid")
        run(srv, "stop", state=state)
        assert_gone(*server)
        # The server did not start PostgreSQL, so its stop leaves PostgreSQL running.
        assert run(pg, "status", state=state, check=False).returncode == 0
    finally:
        run("infra/server/prefect-server.sh", "stop", state=state, check=False)
        run(pg, "stop", state=state, check=False)
    assert_gone(*pg_pid)
    assert run(pg, "status", state=state, check=False).returncode == 3


# ----------------------------------------------------------------------------- SLURM
def _wait_job(job: str, env: dict[str, str], timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
        state = next((f.split("=", 1)[1] for f in out.split() if f.startswith("JobState=")), "")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return out
        time.sleep(0.2)
    raise AssertionError(f"job {job} did not finish in {timeout} s")


@pytest.mark.slurm
@pytest.mark.timeout(900)
def test_local_slurm_schedules_fake_a100_jobs(state, tmp_path):
    script = "infra/slurm/local-slurm.sh"
    install_or_skip(script, state, "SLURM (slurm-wlm, munge)")
    pids = []
    try:
        t0 = time.monotonic()
        out = run(script, "start", "--cpus", "2", "--gpus", "2", state=state).stdout
        startup = time.monotonic() - t0
        conf = state / "slurm/etc/slurm.conf"
        assert f"export SLURM_CONF={conf}" in out
        assert run(script, "env", state=state).stdout.strip() == f"export SLURM_CONF={conf}"
        pids = [recorded(state / f"slurm/run/{d}.pid") for d in ("munged", "slurmctld", "slurmd")]
        env = {**_env(state), "SLURM_CONF": str(conf)}
        sinfo = subprocess.run(["sinfo", "-h", "-o", "%T %G"], env=env, capture_output=True, text=True).stdout
        assert sinfo.split() == ["idle", "gpu:a100:2"], sinfo

        job = subprocess.run(
            [
                "sbatch",
                "--parsable",
                "--gres=gpu:a100:1",
                "-o",
                str(tmp_path / "job-%j.out"),
                "--wrap",
                "echo $CUDA_VISIBLE_DEVICES",
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            cwd=tmp_path,
        ).stdout.strip()
        info = _wait_job(job, env)
        assert "JobState=COMPLETED" in info and "TresPerNode=gres:gpu:a100:1" in info
        assert (tmp_path / f"job-{job}.out").read_text().strip() == "0"
        # Finished jobs are queryable without slurmdbd: the job-completion log.
        jobcomp = (state / "slurm/log/jobcomp.log").read_text().splitlines()
        line = next(x for x in jobcomp if x.startswith(f"JobId={job} "))
        assert "JobState=COMPLETED" in line and "NodeList=monolm-node" in line

        bad = subprocess.run(
            ["sbatch", "--gres=gpu:a100:9", "--wrap", "true"], env=env, capture_output=True, text=True, cwd=tmp_path
        )
        assert bad.returncode != 0
        assert "Requested node configuration is not available" in bad.stderr

        # Idempotent start; a different shape is refused while running.
        run(script, "start", "--cpus", "2", "--gpus", "2", state=state)
        assert [recorded(state / f"slurm/run/{d}.pid") for d in ("munged", "slurmctld", "slurmd")] == pids
        assert "other settings" in run(script, "start", "--gpus", "3", state=state, check=False).stderr

        # stop cancels running jobs (their processes go too) before stopping the daemons.
        job_pid_file = tmp_path / "sleeper.pid"
        subprocess.run(
            [
                "sbatch",
                "--parsable",
                "--gres=gpu:a100:1",
                "-o",
                "/dev/null",
                "--wrap",
                f"echo $$ > {job_pid_file}.tmp && mv {job_pid_file}.tmp {job_pid_file} && exec sleep 300",
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            cwd=tmp_path,
        )
        deadline = time.monotonic() + 30
        while not job_pid_file.exists():
            assert time.monotonic() < deadline, "the sleep job did not start"
            time.sleep(0.1)
        job_proc = int(job_pid_file.read_text())
        job_start = start_time(job_proc)
        assert job_start is not None
        print(f"local SLURM up in {startup:.1f} s")
    finally:
        run(script, "stop", state=state, check=False)
    for pid, start in pids:
        assert_gone(pid, start)
    assert start_time(job_proc) != job_start, "the job's process survived stop"
    assert run(script, "status", state=state, check=False).returncode == 3
