"""Shared machinery of the resilience suite (fixtures live in conftest.py): real processes to kill,
polling for the moment to kill them, snapshots to prove nothing was written, and comparisons of
finished runs.

Processes come from two launchers:
- `fork_worker`: a child of a multiprocessing *forkserver* that pre-imported torch, transformers
  and monolm (nothing computed before the fork, so forking is safe). A child starts in
  milliseconds instead of the ~3 s an import costs, which keeps a dozen kill/resume cycles cheap.
  It is still a real, separate process: it is SIGKILLed and re-run like any job.
- `spawn_cli`: `python -m resilience.worker cli ...`, a fresh interpreter running `monolm`'s own
  command line, exactly as a user (or a SLURM job) starts it.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))
from helpers import micro_sets  # noqa: E402  (the suite's shared micro configuration)

ENV = {
    **os.environ,
    "MONOLM_TORCH_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
}
POLL_S = 0.002


# --------------------------------------------------------------------------- processes
class Proc:
    """A running worker: SIGKILL it, wait for it, read what it printed."""

    def __init__(self, handle: Any, log: Path, forked: bool):
        self.handle, self.log, self.forked = handle, log, forked

    @property
    def pid(self) -> int:
        return self.handle.pid

    def poll(self) -> int | None:
        if self.forked:
            return self.handle.exitcode
        return self.handle.poll()

    def kill(self) -> None:
        """SIGKILL (no handler can run, nothing is flushed) and reap."""
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.wait(30)

    def wait(self, timeout: float = 240) -> int:
        if self.forked:
            self.handle.join(timeout)
            if self.handle.exitcode is None:
                self.kill()
                raise AssertionError(f"worker {self.pid} did not finish in {timeout} s:\n{self.output()}")
            return self.handle.exitcode
        try:
            return self.handle.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"worker {self.pid} did not finish in {timeout} s:\n{self.output()}") from None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def finish(self, timeout: float = 240) -> str:
        """Wait for a successful exit and return the output."""
        code = self.wait(timeout)
        assert code == 0, f"worker exited {code}:\n{self.output()[-6000:]}"
        return self.output()


_FORK_CONTEXT: multiprocessing.context.BaseContext | None = None


def _forkserver():
    global _FORK_CONTEXT
    if _FORK_CONTEXT is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(
            [
                "torch",
                "transformers",
                "transformers.models.gpt_neox.modeling_gpt_neox",
                "safetensors.torch",
                "monolm.training",
                "resilience.worker",
            ]
        )
        _FORK_CONTEXT = ctx
    return _FORK_CONTEXT


def fork_worker(mode: str, spec: dict[str, Any], log: Path) -> Proc:
    from resilience.worker import forked_entry

    ctx = _forkserver()
    proc = ctx.Process(target=forked_entry, args=(mode, spec, str(log)), daemon=False)
    proc.start()
    return Proc(proc, log, forked=True)


def spawn_cli(
    argv: list[str],
    *,
    cwd: Path,
    log: Path,
    audit: dict | None = None,
    pauses: list[dict] | None = None,
    faults: list[dict] | None = None,
    env: dict | None = None,
    user: int | None = None,
) -> Proc:
    spec = {"argv": argv, "pauses": pauses or [], "faults": faults or []}
    if audit:
        spec["audit"] = audit
    out = open(log, "ab")  # noqa: SIM115 (handed to the child process, closed below)
    try:
        handle = subprocess.Popen(
            [sys.executable, "-m", "resilience.worker", "cli", json.dumps(spec)],
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**ENV, **(env or {})},
            user=user,
            group=user,
            extra_groups=[] if user is not None else None,
        )
    finally:
        out.close()
    return Proc(handle, log, forked=False)


def run_cli(argv: list[str], *, cwd: Path, log: Path | None = None, timeout: float = 300, **kw) -> tuple[int, str]:
    if log is None:  # outside `cwd`, so tests can check that nothing at all was written there
        fd, name = tempfile.mkstemp(prefix="monolm-cli-", suffix=".log")
        os.close(fd)
        log = Path(name)
    proc = spawn_cli(argv, cwd=cwd, log=log, **kw)
    code = proc.wait(timeout)
    text = proc.output()
    log.unlink(missing_ok=True)
    return code, text


def wait_for(condition: Callable[[], Any], proc: Proc, *, timeout: float = 240, what: str = "condition") -> Any:
    """Poll until `condition()` is truthy; fail (with the worker's output) if the worker exits first."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            value = condition()
            if value:
                return value
            raise AssertionError(f"worker exited ({proc.poll()}) before {what}:\n{proc.output()[-6000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}:\n{proc.output()[-6000:]}")
        time.sleep(POLL_S)


def pause(target: str, marker: Path, *, match: str = "", nth: int = 1, when: str = "before") -> dict[str, Any]:
    return {"target": target, "marker": str(marker), "match": match, "nth": nth, "when": when}


def kill_at_marker(proc: Proc, marker: Path, timeout: float = 240) -> dict[str, Any]:
    """Wait until the worker reached its pause point, then SIGKILL it; returns the marker's info."""
    wait_for(marker.is_file, proc, timeout=timeout, what=f"pause marker {marker.name}")
    info = json.loads(wait_for(lambda: marker.read_text() or None, proc, what="marker content"))
    proc.kill()
    assert proc.poll() == -signal.SIGKILL, proc.poll()
    return info


# --------------------------------------------------------------------------- files
def snapshot(root: Path) -> dict[str, str]:
    """relative path -> sha256 (directories as 'dir') of everything under `root`."""
    root = Path(root)
    if not root.exists():
        return {}
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def flip_bit(path: Path, offset: int | None = None) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2 if offset is None else offset] ^= 0x01
    path.write_bytes(bytes(raw))


def truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def read_audit(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def micro_argv(tmp: Path, *extra: str, stages: int = 6) -> list[str]:
    """`monolm run --no-prefect` on the micro configuration with its runs under `tmp/runs`."""
    argv = ["run", "--no-prefect", "-q", "--stages", str(stages)]
    for assignment in micro_sets(tmp, *extra):
        argv += ["--set", assignment]
    return argv


class SeedFolders:
    """The stage folders of one seed of one cell of the micro runs: `/ stage` is the stage's folder,
    the model's shared one (`shared/seed-<n>`) for the stages every variant shares, the cell's
    own (`<variant>-<init>/seed-<n>`) for the others."""

    def __init__(self, tmp: Path, seed: int, variant: str, init: str = "abs"):
        from monolm.study.registry import MODEL_STAGES

        model = tmp / "runs" / "tiny" / "tiny-neox"
        self.cell, self.shared = model / f"{variant}-{init}" / f"seed-{seed}", model / "shared" / f"seed-{seed}"
        self._shared_stages = MODEL_STAGES

    def __truediv__(self, stage: str) -> Path:
        return (self.shared if stage in self._shared_stages else self.cell) / stage

    @property
    def roots(self) -> tuple[Path, Path]:
        return self.cell, self.shared

    def iterdir(self) -> list[Path]:
        return [p for root in self.roots if root.is_dir() for p in root.iterdir()]


def seed_dir(tmp: Path, seed: int = 42, variant: str = "mlp_in") -> SeedFolders:
    return SeedFolders(tmp, seed, variant)


def manifest(stage_dir: Path) -> dict[str, Any]:
    return json.loads((stage_dir / "manifest.json").read_text())


def temp_reads(records: list[dict[str, Any]]) -> list[str]:
    """Temp files (`.tmp-*`) a process opened without having created them itself: a writer
    re-opening its own temp file to fsync it is fine, reading someone else's is the bug."""
    created: set[str] = set()
    created_dirs: list[str] = []
    bad = []
    for rec in records:
        path = rec["paths"][0]
        if rec["event"] == "os.mkdir":
            created_dirs.append(path.rstrip("/") + "/")
            continue
        if rec["event"] != "open" or "/.tmp-" not in path:
            continue
        mode, flags = rec.get("mode") or "", rec.get("flags") or 0
        creates = any(c in mode for c in "wxa") or bool(flags & os.O_CREAT)
        if creates:
            created.add(path)
        elif path not in created and not any(path.startswith(d) for d in created_dirs):
            bad.append(path)
    return bad


def written_paths(records: list[dict[str, Any]]) -> set[str]:
    """Every path a process created, wrote, renamed into place or removed."""
    out: set[str] = set()
    for rec in records:
        if rec["event"] == "open":
            mode, flags = rec.get("mode") or "", rec.get("flags") or 0
            if any(c in mode for c in "wxa+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                out.add(rec["paths"][0])
        else:
            out.update(rec["paths"])
    return out


WALL_CLOCK = ("tokens_per_s", "wall_time_s", "seconds")


def strip_wall_clock(obj: Any) -> Any:
    """JSON minus wall-clock measurements and the record of resumes (which differ by design)."""
    if isinstance(obj, dict):
        return {k: strip_wall_clock(v) for k, v in obj.items() if k not in WALL_CLOCK and k != "resumes"}
    if isinstance(obj, list):
        return [strip_wall_clock(v) for v in obj]
    return obj


def stage_outputs(seed_folder: SeedFolders, stages: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """What each finished stage produced, comparable across runs: every output's sha256 as its
    manifest records it, except the two files that carry the machine's state rather than results
    (training histories hold wall-clock speeds, stage 0's verification the free disk space),
    which are compared without those fields."""
    out: dict[str, dict[str, Any]] = {}
    for stage in stages:
        path = seed_folder / stage / "manifest.json"
        if not path.is_file():
            continue
        files: dict[str, Any] = {}
        for rel, digest in json.loads(path.read_text())["outputs"].items():
            if rel.endswith("history.json"):
                files[rel] = strip_wall_clock(json.loads((seed_folder / stage / rel).read_text()))
            elif rel == "verification.json":
                report = json.loads((seed_folder / stage / rel).read_text())
                report["checks"].pop("disk", None)
                files[rel] = report
            else:
                files[rel] = digest
        out[stage] = files
    return out
