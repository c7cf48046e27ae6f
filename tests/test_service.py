"""The service path, for real: a Prefect server on a free loopback port (infra/server), the work
pool, `prefect deploy --all` of prefect.yaml and a process worker (infra/worker.sh); runs started
with the CLI exactly as a user types them, retried with the UI's API call, crashed by killing
processes, served from one process (deployments/serve.py), and the same on PostgreSQL.

One server and worker are shared by the module (start-up is the slow part). Everything runs on
the micro config of the tiny preset (`conftest.MICRO`), passed as a deployment parameter."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import micro_sets

from monolm.study.registry import STAGE_NAMES

REPO = Path(__file__).resolve().parents[1]
PREFECT = REPO / ".venv/bin/prefect"
STAGES = STAGE_NAMES  # every stage of a one-cell run, in the order they run, stage 7 last
UPSTREAM = STAGES[:7]  # everything before the cell's UAT (the baseline's share of UAT included)
DEPLOYMENTS = (
    "seed-42",
    "seed-1337",
    "seed-2024",
    "seed-8888",
    "seed-12345",
    "all-seeds",
    "variants",
    "nightly-quick",
)
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
TZ = "Europe/Berlin"  # the nightly time zone "from config" in these tests (the default is UTC)
# What the deploying user chose for the nightly in these tests (MONOLM_NIGHTLY_*, read at deploy time).
NIGHTLY_ENV = {
    "MONOLM_NIGHTLY_PRESET": "tiny",
    "MONOLM_NIGHTLY_PROFILE": "slurm",
    "MONOLM_NIGHTLY_CONFIG": "infra/site-a100.example.yaml",
}
NIGHTLY_PARAMETERS = {
    "preset": "tiny",
    "profile": "slurm",
    "config_file": "infra/site-a100.example.yaml",
    "nightly": True,
}


# ----------------------------------------------------------------------------- helpers
def start_time(pid: int) -> str | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def require_tools() -> None:
    if not PREFECT.exists():
        pytest.skip("the prefect CLI is not installed in .venv (run `make install`)")
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (apt-get install -y curl); the infra scripts use it for health checks")


class Service:
    """One server + worker started through the infra scripts, in its own state dir."""

    def __init__(self, state: Path, db: str = "sqlite"):
        self.state, self.db = state, db
        self.faults = state / "faults.json"  # MONOLM_FAULTS of every flow run this worker starts
        # MONOLM_NIGHTLY left out: deployed as on a laptop, the nightly schedule inactive
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MONOLM_NIGHTLY"))}
        self.env.update(
            MONOLM_STATE_DIR=str(state),
            PREFECT_HOME=str(state / "prefect"),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_WORKER_QUERY_SECONDS="1",
            PREFECT_RUNNER_POLL_FREQUENCY="1",
            MONOLM_FAULTS=str(self.faults),
            MONOLM_SITE_DIR=str(state / "sites"),  # the site files deployment runs may name (flows/params.py)
            MONOLM_NIGHTLY_TZ=TZ,
            **NIGHTLY_ENV,
            HF_HUB_OFFLINE="1",
            MONOLM_TORCH_THREADS="1",
        )
        self.api = ""
        self.auth = ""  # the generated API auth string (<state>/prefect/auth), once started
        self.timings: dict[str, float] = {}

    def script(self, script: str, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [str(REPO / script), *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode:
            raise AssertionError(f"{script} {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def start(self) -> None:
        port = self.script("infra/free-port.sh").stdout.strip()
        t0 = time.monotonic()
        self.api = self.script(
            "infra/server/prefect-server.sh", "start", "--port", port, "--db", self.db, timeout=600
        ).stdout.strip()
        self.timings["server_start_s"] = time.monotonic() - t0
        self.env["PREFECT_API_URL"] = self.api
        # Not in self.env: the scripts and `monolm runs` must find it themselves; user_env has it.
        self.auth = (self.state / "prefect/auth").read_text().strip()
        self.start_worker(deploy=True)

    @property
    def user_env(self) -> dict[str, str]:
        """The environment of a user who followed `make serve`'s instructions (auth string exported)."""
        return {**self.env, "PREFECT_API_AUTH_STRING": self.auth}

    def start_worker(self, deploy: bool) -> None:
        t0 = time.monotonic()
        out = self.script("infra/worker.sh", "start", *([] if deploy else ["--no-deploy"])).stderr
        self.timings["worker_start_s" if deploy else "worker_restart_s"] = time.monotonic() - t0
        if deploy:
            self.timings["deploy_s"] = float(re.search(r"deployed in (\d+) s", out).group(1))
        self.timings["worker_online_s"] = float(re.search(r"online in (\d+) s", out).group(1))

    def stop(self) -> None:
        self.script("infra/worker.sh", "stop", check=False)
        self.script("infra/server/prefect-server.sh", "stop", check=False)

    # -- the CLI, as a user types it
    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [str(PREFECT), *args], env=self.user_env, cwd=REPO, capture_output=True, text=True, timeout=timeout
        )
        assert proc.returncode == 0, f"prefect {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc

    def run_deployment(self, name: str, sets: list[str]) -> str:
        """A deployment run may not set config keys: `sets` go into a site file in MONOLM_SITE_DIR
        (as the person who starts the service would write one), which the run names."""
        import hashlib

        import yaml

        from monolm.config.loading import deep_merge, parse_set

        site: dict = {}
        for assignment in sets:
            site = deep_merge(site, parse_set(assignment))
        text = yaml.safe_dump(site)
        path = self.state / "sites" / f"site-{hashlib.sha256(text.encode()).hexdigest()[:12]}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        out = self.cli("deployment", "run", name, "--param", "preset=tiny", "--param", f"config_file={path.name}")
        return re.search(r"UUID: ([0-9a-f-]{36})", out.stdout).group(1)

    # -- the API
    def call(self, fn):
        """Run `await fn(client)` with a client of this server (not the test process's settings)."""
        from prefect.client.orchestration import PrefectClient

        async def go():
            async with PrefectClient(self.api, auth_string=self.auth) as client:
                return await fn(client)

        return asyncio.run(go())

    def flow_run(self, flow_run_id: str):
        return self.call(lambda c: c.read_flow_run(flow_run_id))

    def wait(self, flow_run_id: str, timeout: float = 300, done=lambda run: run.state_type.value in FINAL):
        deadline = time.monotonic() + timeout
        while True:
            run = self.flow_run(flow_run_id)
            if done(run):
                return run
            if time.monotonic() > deadline:
                log = (self.state / "worker/local.log").read_text()[-4000:]
                raise AssertionError(
                    f"flow run {flow_run_id} is {run.state_name} after {timeout} s; worker log:\n{log}"
                )
            time.sleep(0.5)

    def stage_states(self, flow_run_id: str) -> dict[str, str]:
        """State name per stage in the newest `experiment-stages` sub-flow run of a flow run."""
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterParentFlowRunId,
            TaskRunFilter,
            TaskRunFilterFlowRunId,
        )

        async def go(client):
            subs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
            )
            if not subs:
                return {}
            newest = max(subs, key=lambda s: s.created)
            runs = await client.read_task_runs(
                task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[newest.id]))
            )
            return {stage_of(t.name): t.state_name for t in runs}

        return self.call(go)


def stage_of(task_run_name: str) -> str:
    """`train-baseline-seed-42` -> `train_baseline`; `aggregate` -> `aggregate`."""
    name = re.sub(r"-seed-\d+$", "", task_run_name)
    name = "aggregate" if name.startswith("aggregate") else name
    return name.replace("-", "_")


def new_state_dir() -> Path:
    """A state dir other users can traverse (PostgreSQL runs as the `postgres` system user)."""
    path = Path(tempfile.mkdtemp(prefix="monolm-service-test-"))
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def service():
    require_tools()
    svc = Service(new_state_dir())
    try:
        svc.start()
        print(f"\nservice start-up: {svc.timings}")
        yield svc
    finally:
        svc.stop()
        server = svc.state / "prefect/server.pid"
        assert not server.exists(), "the server's PID file outlived stop"
        shutil.rmtree(svc.state, ignore_errors=True)


@pytest.fixture(scope="module")
def shared_runs():
    """One runs/results root for the runs that may reuse each other's stages (a cache hit there
    is a feature: those tests are about the service, not the stages)."""
    path = new_state_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- prefect.yaml (no server)
def test_prefect_yaml_declares_every_deployment():
    from deployments.serve import deployment_specs

    specs = {s["name"]: s for s in deployment_specs()}
    assert tuple(specs) == DEPLOYMENTS
    assert {s["entrypoint"] for s in specs.values()} == {"flows/experiment.py:experiment"}
    for seed in (42, 1337, 2024, 8888, 12345):
        assert specs[f"seed-{seed}"]["parameters"] == {"seeds": [seed], "preset": "tiny"}
    assert specs["all-seeds"]["parameters"] == {"seeds": [42, 1337, 2024, 8888, 12345], "preset": "tiny"}
    assert specs["variants"]["parameters"] == {"variants": ["all"], "preset": "tiny"}
    assert all(not s["schedules"] for name, s in specs.items() if name != "nightly-quick")


def test_nightly_schedule_defaults_and_configuration(monkeypatch):
    """02:00 UTC unless MONOLM_NIGHTLY_CRON / MONOLM_NIGHTLY_TZ say otherwise (evaluated by the
    same build steps `prefect deploy` runs)."""
    from deployments.serve import as_bool, deployment_specs

    for name in ("MONOLM_NIGHTLY_CRON", "MONOLM_NIGHTLY_TZ", "MONOLM_NIGHTLY", *NIGHTLY_ENV):
        monkeypatch.delenv(name, raising=False)
    nightly = {s["name"]: s for s in deployment_specs()}["nightly-quick"]
    (default,) = nightly["schedules"]
    assert (default["cron"], default["timezone"]) == ("0 2 * * *", "UTC")
    # The quick preset, with the preset's profile and no site file (the flow reads "" as unset).
    defaults = {"preset": "quick", "profile": "", "config_file": "", "nightly": True}
    assert default["parameters"] == nightly["parameters"] == defaults
    assert as_bool(default["active"]) is False  # inactive unless switched on
    monkeypatch.setenv("MONOLM_NIGHTLY_CRON", "30 3 * * 1-5")
    monkeypatch.setenv("MONOLM_NIGHTLY_TZ", "Asia/Tokyo")
    monkeypatch.setenv("MONOLM_NIGHTLY", "on")
    for name, value in NIGHTLY_ENV.items():
        monkeypatch.setenv(name, value)
    nightly = {s["name"]: s for s in deployment_specs()}["nightly-quick"]
    (custom,) = nightly["schedules"]
    assert (custom["cron"], custom["timezone"]) == ("30 3 * * 1-5", "Asia/Tokyo")
    assert custom["parameters"] == nightly["parameters"] == NIGHTLY_PARAMETERS
    assert as_bool(custom["active"]) is True


def test_crash_helper_recognises_dead_and_recycled_pids():
    """A PID counts as the run's process only while it lives and started between the run's
    creation and its start; otherwise (gone, zombie, or a later process reusing the number) the
    run is dead."""
    import datetime as dt

    from deployments.crashed import parse_pid, process_started_at, run_process_alive

    now = dt.datetime.now(dt.UTC)
    me = process_started_at(os.getpid())
    assert me is not None and me <= now
    assert run_process_alive(os.getpid(), created=me - dt.timedelta(seconds=5), started=me + dt.timedelta(seconds=1))[0]
    # The run was created an hour after this process started: the PID was recycled.
    recycled, why = run_process_alive(os.getpid(), created=now + dt.timedelta(hours=1), started=None)
    assert not recycled and "belongs to a process started at" in why
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert run_process_alive(child.pid, created=me, started=None) == (False, f"process {child.pid} is gone")
    assert (parse_pid("4242"), parse_pid("node7:4242"), parse_pid(None), parse_pid("pod/abc")) == (
        4242,
        4242,
        None,
        None,
    )


# ----------------------------------------------------------------------------- the service
@pytest.mark.service
@pytest.mark.timeout(600)
def test_deployed_tiny_run_completes(service, shared_runs):
    """`prefect deployment run experiment/seed-42 --param preset=tiny ...` as typed by a user:
    the worker runs it, the flow run and every stage task run end Completed, the files exist."""
    t0 = time.monotonic()
    flow_run_id = service.run_deployment("experiment/seed-42", micro_sets(shared_runs))
    run = service.wait(flow_run_id)
    wall = time.monotonic() - t0
    print(
        f"\ndeployed tiny (micro) run: {wall:.1f} s wall from `prefect deployment run` to Completed "
        f"(flow run {run.total_run_time.total_seconds():.1f} s)"
    )
    assert run.state_name == "Completed", run.state.message
    assert run.parameters["seeds"] == [42] and run.parameters["preset"] == "tiny"
    assert run.work_pool_name == "local" and run.infrastructure_pid
    assert service.stage_states(flow_run_id) == {stage: "Completed" for stage in STAGES}

    from monolm.core.artifacts import MANIFEST
    from monolm.report.stage import RESULT_FILES
    from monolm.store import ResultsStore

    (report,) = (shared_runs / "results").glob("*/report.md")
    assert all((report.parent / f).is_file() for f in (*RESULT_FILES, MANIFEST))
    for stage in STAGES[:-1]:
        assert len(list((shared_runs / "runs").glob(f"tiny/*/*/seed-42/{stage}/{MANIFEST}"))) == 1, stage
    with ResultsStore(f"sqlite:///{shared_runs / 'runs/results.sqlite'}") as store:
        assert [r["status"] for r in store.runs("tiny")] == ["completed"]
    # The results table and report are published on the run for the UI.
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
    )

    async def artifact_keys(client):  # on the run the deployment run created, not only its sub-flow
        arts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
        return {a.key.split("-")[0] for a in arts if a.key}

    assert {"results", "report"} <= service.call(artifact_keys)
    assert "Report: artifact `report-" in run.state.message, run.state.message


def screenshot_dir() -> Path:
    """Where the browser test writes its screenshots: $MONOLM_SCREENSHOTS (`make screenshots`), else
    .state/test-artifacts/browser (kept after a failure, for a reviewer or CI to look at)."""
    return Path(os.environ.get("MONOLM_SCREENSHOTS") or REPO / ".state/test-artifacts/browser").resolve()


@pytest.mark.service
@pytest.mark.browser
@pytest.mark.timeout(600)
def test_ui_shows_the_run_its_stages_and_the_report_with_figures(service):
    """A deployed tiny run seen in headless Chromium (Prefect's default UI): the flow run page
    shows it Completed, its stages sub-flow page every stage task run Completed, and the
    report artifact page the report's findings and its three figures loaded. Screenshots of each
    page go to `screenshot_dir()` (always with MONOLM_SCREENSHOTS, else on failure)."""
    from browser import Browser, ensure_chromium
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )

    try:
        ensure_chromium()
    except RuntimeError as exc:
        if os.environ.get("CI"):  # CI runs as root with apt: there the browser test must run
            raise
        pytest.skip(str(exc))
    flow_run_id = service.run_deployment("experiment/seed-42", micro_sets(service.state / "browser"))
    run = service.wait(flow_run_id)
    assert run.state_name == "Completed", run.state.message

    async def stages_and_report(client):
        (sub,) = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
        )
        arts = await client.read_artifacts(  # the report is on the run the deployment run links to
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
        (report,) = [a for a in arts if a.key and a.key.startswith("report-")]
        return sub, report

    sub, report = service.call(stages_and_report)
    ui = service.api.removesuffix("/api") + "/v2"
    shots = screenshot_dir()
    n = len(STAGES)  # every seed stage and the aggregate are task runs of the stages sub-flow
    pages = {
        "flow-run": (f"{ui}/runs/flow-run/{flow_run_id}", (run.name, "Completed", "seed-42", "experiment")),
        "flow-run-artifacts": (f"{ui}/runs/flow-run/{flow_run_id}?tab=Artifacts", (report.key, "results-")),
        "stage-task-runs": (
            f"{ui}/runs/flow-run/{sub.id}?tab=TaskRuns",
            (sub.name, f"{n} Task runs", f"({n} Completed)", *(f"{s.replace('_', '-')}-seed-42" for s in STAGES[:-1])),
        ),
        "progress-artifacts": (f"{ui}/runs/flow-run/{sub.id}?tab=Artifacts", ("PROGRESS", "hotflip seed 42")),
        "report": (f"{ui}/artifacts/artifact/{report.id}", (report.key, "Findings", "Quality", "Plots")),
    }
    loaded_figures = (
        "Array.from(document.images).filter(i => i.src.startsWith('data:image/png;base64,') && i.complete "
        "&& i.naturalWidth >= 600 && i.getBoundingClientRect().width > 300).length"
    )
    with Browser.launch() as browser:
        # The UI asks for the auth string once and keeps it (base64) in the origin's localStorage.
        browser.open(ui).evaluate(f"localStorage.setItem('prefect-password', btoa({json.dumps(service.auth)}))")
        for name, (url, needles) in pages.items():
            page = browser.open(url)
            try:
                page.wait_for_text(*needles, timeout=60)
                if name == "stage-task-runs":
                    assert page.text().count("Completed") >= n + 1  # the sub-flow run and its task runs
                if name == "report":
                    assert page.wait_for(f"{loaded_figures} === 3", what="the three figures loaded") is True
                if not os.environ.get("MONOLM_SCREENSHOTS"):
                    continue
                time.sleep(3)  # the run graph is drawn after the text
                page.screenshot(shots / f"{name}.png")
                if name == "report":  # and the figures as a reader scrolls to them
                    page.evaluate("document.images[0].scrollIntoView({block: 'start'})")
                    time.sleep(0.5)
                    page.screenshot(shots / "report-figures.png", full_page=False)
            except BaseException:
                path = page.screenshot(shots / f"FAILED-{name}.png")
                print(f"\nscreenshot of the failing page: {path}")
                raise
    print(f"\nUI screenshots in {shots}")


@pytest.mark.service
@pytest.mark.timeout(600)
def test_failed_run_retried_like_the_ui_resumes_from_cache(service):
    """Stage 5 (UAT) fails (fault injection in the worker's environment), the run ends Failed;
    the fault is cleared and the same flow run is retried with the call the UI's Retry button
    makes; it completes and stages 0-4 are cache hits, not executed again."""
    runs = service.state / "retry"
    service.faults.write_text(json.dumps({"uat": 1}))
    try:
        flow_run_id = service.run_deployment("experiment/seed-42", micro_sets(runs, "runner.retries=0"))
        failed = service.wait(flow_run_id)
        assert failed.state_name == "Failed"
        first = service.stage_states(flow_run_id)
        assert {s: first[s] for s in (*UPSTREAM, "uat")} == {**{s: "Completed" for s in UPSTREAM}, "uat": "Failed"}
        assert first["aggregate"] != "Completed"
        assert json.loads(service.faults.read_text()) == {"uat": 0}  # it fired
    finally:
        service.faults.unlink(missing_ok=True)  # clear the fault

    # The UI (prefect's V2 UI, RetryFlowRunDialog; checked with 3.8.8) posts exactly this; the V1
    # UI sends the same state with force=false.
    # Like the UI, it sends the auth string the user entered (Basic) and the CSRF token it fetched
    # for its client id (the server has CSRF protection on).
    import base64

    body = {"state": {"type": "SCHEDULED", "name": "AwaitingRetry", "message": "Retry from the UI"}, "force": True}
    headers = {
        "Content-Type": "application/json",
        "Authorization": f"Basic {base64.b64encode(service.auth.encode()).decode()}",
    }
    client = "monolm-ui-retry-test"
    csrf = urllib.request.Request(f"{service.api}/csrf-token?client={client}", headers=headers)
    with urllib.request.urlopen(csrf, timeout=30) as resp:
        headers |= {"Prefect-Csrf-Token": json.loads(resp.read())["token"], "Prefect-Csrf-Client": client}
    req = urllib.request.Request(
        f"{service.api}/flow_runs/{flow_run_id}/set_state", data=json.dumps(body).encode(), headers=headers
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert json.loads(resp.read())["status"] == "ACCEPT"
    retried = service.wait(flow_run_id, done=lambda r: r.run_count >= 2 and r.state_type.value in FINAL)
    assert retried.id == failed.id and retried.state_name == "Completed", retried.state.message
    second = service.stage_states(flow_run_id)
    assert second == {
        **{s: "Cached" for s in UPSTREAM},
        "uat": "Completed",
        "hotflip_baseline": "Cached",
        "hotflip": "Cached",
        "gcg_baseline": "Cached",
        "gcg": "Cached",
        "damage": "Cached",  # the damage-matched arm needs stages 0-3 only
        "ladder": "Cached",  # the quality ladder needs only stage 0: it finished before the retry
        "aggregate": "Completed",
    }


def nightly_runs(service, deployment_id) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    return service.call(
        lambda c: c.read_flow_runs(
            flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]))
        )
    )


@pytest.mark.service
@pytest.mark.timeout(300)
def test_nightly_schedule_is_inactive_unless_switched_on(service):
    """nightly-quick as the server holds it after `prefect deploy --all` (what `make serve` runs):
    the cron schedule at 02:00 in the configured time zone with the quick-preset parameters, but
    inactive, so a laptop never starts a Pythia-1.4B download by itself and no run is scheduled.
    Deployed again with MONOLM_NIGHTLY=on, the schedule is active and the scheduler creates its runs."""
    deployments = {n: service.call(lambda c, n=n: c.read_deployment_by_name(f"experiment/{n}")) for n in DEPLOYMENTS}
    for name, dep in deployments.items():
        assert dep.work_pool_name == "local", name
        assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    assert deployments["seed-2024"].parameters == {"seeds": [2024], "preset": "tiny"}
    nightly = deployments["nightly-quick"]
    (schedule,) = nightly.schedules
    assert schedule.active is False and schedule.parameters == NIGHTLY_PARAMETERS
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 2 * * *", TZ)
    assert nightly.parameters == NIGHTLY_PARAMETERS
    assert nightly_runs(service, nightly.id) == []

    on = subprocess.run(
        [str(PREFECT), "--no-prompt", "deploy", "--name", "nightly-quick"],
        env={**service.user_env, "MONOLM_NIGHTLY": "on"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert on.returncode == 0, on.stdout + on.stderr
    redeployed = service.call(lambda c: c.read_deployment_by_name("experiment/nightly-quick"))
    assert redeployed.id == nightly.id
    (schedule,) = redeployed.schedules
    assert schedule.active is True and (schedule.schedule.cron, schedule.schedule.timezone) == ("0 2 * * *", TZ)

    deadline = time.monotonic() + 90
    while not (runs := nightly_runs(service, nightly.id)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert runs, "the scheduler created no run for the active nightly schedule within 90 s"
    import zoneinfo

    for run in runs:
        assert run.auto_scheduled and run.state_name == "Scheduled"
        assert run.parameters == NIGHTLY_PARAMETERS
        local = run.expected_start_time.astimezone(zoneinfo.ZoneInfo(TZ))
        assert (local.hour, local.minute) == (2, 0), local
    # Nothing here may run the real quick preset (it downloads Pythia): pausing deletes them.
    service.call(lambda c: c.pause_deployment(nightly.id))


@pytest.mark.service
@pytest.mark.timeout(300)
def test_monolm_runs_shows_each_state_in_full(service):
    """`monolm runs` (and `make status`) against the service: a run due next year shows as
    Scheduled with its deployment, whatever the terminal's width."""
    import datetime as dt

    from prefect.states import Scheduled

    seed_42 = service.call(lambda c: c.read_deployment_by_name("experiment/seed-42"))
    due = dt.datetime.now(dt.UTC) + dt.timedelta(days=365)
    flow_run = service.call(
        lambda c: c.create_flow_run_from_deployment(seed_42.id, state=Scheduled(scheduled_time=due))
    )
    try:
        out = subprocess.run(
            [sys.executable, "-m", "flows.cli", "runs"],
            env={**service.env, "COLUMNS": "60"},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        # Too narrow for one line per run: each run is named on its own line, its one-valued
        # columns below it as whole `name: value` pairs (never cut), up to the next run.
        lines = out.stdout.splitlines()
        start = lines.index(f"flow run: {flow_run.name}")
        block = next(
            (lines[start + 1 : i] for i in range(start + 1, len(lines)) if lines[i].startswith("flow run: ")),
            lines[start + 1 :],
        )
        assert all(len(line) <= 60 for line in block), out.stdout
        for pair in (
            "deployment: experiment/seed-42",
            "state: Scheduled",
            f"started / due: {due.astimezone().strftime('%Y-%m-%d')}",
        ):
            assert any(pair in line for line in block), (pair, out.stdout)
    finally:
        service.call(lambda c: c.delete_flow_run(flow_run.id))


@pytest.mark.service
@pytest.mark.timeout(600)
def test_killed_run_is_marked_crashed(service):
    """Worker and flow-run process killed (as by the OOM killer or a reboot): the run stays
    Running on the server; `python -m deployments.crashed` marks it and its stages Crashed, and
    leaves live runs alone."""
    runs = service.state / "crash"
    # A long stage 0 (pre-training) keeps the run busy while we look at it.
    flow_run_id = service.run_deployment("experiment/seed-42", micro_sets(runs, "model.tiny.pretrain_steps=100000"))

    def setup_running(run) -> bool:
        if run.state_type.value in FINAL:
            return True
        return run.state_name == "Running" and service.stage_states(flow_run_id).get("setup") == "Running"

    run = service.wait(flow_run_id, timeout=120, done=setup_running)
    assert run.state_name == "Running"
    helper = [sys.executable, "-m", "deployments.crashed", "--pool", "local"]
    alive = subprocess.run(helper, env=service.env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert alive.returncode == 0 and "no dead flow runs" in alive.stdout, alive.stdout + alive.stderr
    assert service.flow_run(flow_run_id).state_name == "Running"

    worker = int((service.state / "worker/local.pid").read_text())
    assert start_time(worker) == (service.state / "worker/local.pid.start").read_text().strip()
    flow_pid = int(run.infrastructure_pid)
    flow_start = start_time(flow_pid)
    os.kill(worker, signal.SIGKILL)  # first the worker, or it would report the crash itself
    os.kill(flow_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while start_time(flow_pid) == flow_start and time.monotonic() < deadline:
        time.sleep(0.1)
    assert start_time(flow_pid) != flow_start
    try:
        time.sleep(2)  # a live worker would have reported it by now
        assert service.flow_run(flow_run_id).state_name == "Running"  # stuck

        marked = subprocess.run(helper, env=service.env, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert marked.returncode == 0, marked.stderr
        assert (
            f"marked Crashed: flow run '{run.name}' ({flow_run_id}, Running); process {flow_pid} is gone"
            in marked.stdout
        ), marked.stdout
        crashed = service.flow_run(flow_run_id)
        assert crashed.state_name == "Crashed" and f"process {flow_pid} is gone" in crashed.state.message
        assert service.stage_states(flow_run_id)["setup"] == "Crashed"

        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

        subs = service.call(
            lambda c: c.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
            )
        )
        assert [s.state_name for s in subs] == ["Crashed"]
        again = subprocess.run(helper, env=service.env, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert "no dead flow runs" in again.stdout  # idempotent
    finally:
        service.start_worker(deploy=False)  # the module's later tests need a worker


# These two run before test_serve_runs_all_deployments_from_one_process: serving re-registers
# the deployments as served ones (no work pool), so after it the pool's job template no longer
# applies to experiment/seed-42 and no worker picks up its runs.
# ----------------------------------------------------------------------------- security (issue 21)
@pytest.mark.service
@pytest.mark.security
@pytest.mark.timeout(300)
def test_pool_refuses_a_flow_run_that_sets_command_or_env(service):
    """The probe of issue 21: `job_variables.command` became the command the worker ran. The
    pool's job template has no `command`, `env` or `working_dir`, so the server refuses a flow run
    that sets one (HTTP 422), before any worker sees it."""
    import datetime as dt

    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.states import Scheduled

    pool = service.call(lambda c: c.read_work_pool("local"))
    assert not {"command", "env", "working_dir"} & set(pool.base_job_template["variables"]["properties"])
    assert not {"command", "env", "working_dir"} & set(pool.base_job_template["job_configuration"])
    seed_42 = service.call(lambda c: c.read_deployment_by_name("experiment/seed-42"))
    owned = service.state / "owned.txt"
    due = dt.datetime.now(dt.UTC) + dt.timedelta(days=365)  # never due, should one be accepted
    for job_variables in (
        {"command": f"sh -c 'id > {owned}'"},
        {"env": {"LD_PRELOAD": str(owned)}},
        {"working_dir": str(service.state)},
    ):
        with pytest.raises(PrefectHTTPStatusError) as refused:
            service.call(
                lambda c, jv=job_variables: c.create_flow_run_from_deployment(
                    seed_42.id, job_variables=jv, state=Scheduled(scheduled_time=due)
                )
            )
        assert refused.value.response.status_code == 422, job_variables
    assert not owned.exists()


@pytest.mark.service
@pytest.mark.security
@pytest.mark.timeout(300)
def test_deployment_run_that_sets_config_keys_fails_without_echoing_them(service, shared_runs):
    """The probe of issue 21: `overrides` reached the sbatch script and any path. A deployment run
    that sets a config key fails before any stage, naming the parameter; a planted secret in the
    value appears in no log of the run."""
    secret = "hf" + "_" + "q" * 34  # built at run time, no token literal in the source
    sets = [f"paths.results_root={shared_runs / secret}", f"runner.slurm.prologue=['echo {secret}']"]
    out = service.cli(
        "deployment", "run", "experiment/seed-42", "--param", "preset=tiny", "--param", f"overrides={json.dumps(sets)}"
    )
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", out.stdout).group(1)
    run = service.wait(flow_run_id)
    assert run.state_name == "Failed"
    assert "overrides:" in run.state.message and secret not in run.state.message

    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    def run_logs() -> list:
        return service.call(lambda c: c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id]))))

    def refused(entries: list) -> bool:
        return any("overrides: a deployment run may not set config keys" in entry.message for entry in entries)

    # The flow run's logs reach the API in batches, possibly after its state: wait for them (a condition).
    logs, waited = run_logs(), time.monotonic() + 60
    while not refused(logs) and time.monotonic() < waited:
        time.sleep(0.5)
        logs = run_logs()
    assert refused(logs), [entry.message for entry in logs]
    assert not [entry.message for entry in logs if secret in entry.message]
    assert secret not in (service.state / "worker/local.log").read_text()  # the flow run's own output
    assert not (shared_runs / secret).exists()


@pytest.mark.service
@pytest.mark.timeout(600)
def test_serve_runs_all_deployments_from_one_process(service, shared_runs):
    """`python -m deployments.serve` refuses to shadow worker deployments, replaces them with
    --replace, and executes a run of experiment/seed-42 itself (no work pool)."""
    cmd = [sys.executable, "-m", "deployments.serve"]
    refused = subprocess.run(cmd, env=service.env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "experiment/seed-42 (work pool local)" in refused.stderr, refused.stderr

    log = open(service.state / "serve.log", "w")  # noqa: SIM115 (the served process writes it until it is stopped)
    proc = subprocess.Popen(
        [*cmd, "--replace"], env=service.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (service.state / "serve.log").read_text()[-3000:]
            try:
                dep = service.call(lambda c: c.read_deployment_by_name("experiment/seed-42"))
                if dep.work_pool_name is None and dep.status and dep.status.value == "READY":
                    break
            except Exception:  # deleted and not yet re-created
                pass
            assert time.monotonic() < deadline, "serve did not register its deployments"
            time.sleep(0.5)
        flow_run_id = service.run_deployment("experiment/seed-42", micro_sets(shared_runs))
        run = service.wait(flow_run_id)
        assert run.state_name == "Completed", (service.state / "serve.log").read_text()[-3000:]
        assert run.work_pool_name is None  # executed by the serve process, not the worker
        assert set(service.stage_states(flow_run_id)) == set(STAGES)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


# ----------------------------------------------------------------------------- PostgreSQL
@pytest.mark.service
@pytest.mark.postgres
@pytest.mark.timeout(900)
def test_deployed_run_on_postgresql(shared_runs):
    """The same deployed run with the server on PostgreSQL (installed if missing): the flow run
    and its stage task runs are rows in PostgreSQL."""
    state = new_state_dir()
    pg = Service(state, db="postgres")
    install = pg.script("infra/postgres/postgres.sh", "install", timeout=900, check=False)
    if install.returncode:
        shutil.rmtree(state, ignore_errors=True)
        pytest.skip(f"PostgreSQL is not installed and could not be installed here: {install.stderr[-500:]}")
    try:
        pg.start()
        print(f"\nservice start-up on PostgreSQL: {pg.timings}")
        assert not (state / "prefect/prefect.db").exists()
        flow_run_id = pg.run_deployment("experiment/seed-42", micro_sets(shared_runs))
        run = pg.wait(flow_run_id)
        assert run.state_name == "Completed", run.state.message

        import asyncpg

        dsn = (
            pg.script("infra/postgres/postgres.sh", "url")
            .stdout.strip()
            .replace("postgresql+asyncpg://", "postgresql://")
        )

        async def rows():
            conn = await asyncpg.connect(dsn)
            try:
                flow = await conn.fetchrow(
                    "SELECT f.state_type, f.state_name, d.name AS deployment, f.parameters FROM flow_run f "
                    "JOIN deployment d ON d.id = f.deployment_id WHERE f.id = $1",
                    run.id,
                )
                tasks = await conn.fetch(
                    "SELECT t.name, t.state_name FROM task_run t JOIN flow_run s ON s.id = t.flow_run_id "
                    "JOIN task_run p ON p.id = s.parent_task_run_id WHERE p.flow_run_id = $1",
                    run.id,
                )
                return flow, tasks
            finally:
                await conn.close()

        flow, tasks = asyncio.run(rows())
        assert (flow["state_type"], flow["state_name"], flow["deployment"]) == ("COMPLETED", "Completed", "seed-42")
        assert json.loads(flow["parameters"])["preset"] == "tiny"
        assert {stage_of(t["name"]) for t in tasks} == set(STAGES)
        assert {t["state_name"] for t in tasks} <= {"Completed", "Cached"}
    finally:
        pg.stop()
        shutil.rmtree(state, ignore_errors=True)
