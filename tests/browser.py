"""Headless Chromium for the tests, driven over the DevTools protocol (CDP) with `websockets`
(already installed with Prefect): no browser build downloaded at install time, no driver binary,
no extra package. Debian's `chromium` is installed with apt when missing (`ensure_chromium`).

    with Browser.launch() as browser:
        page = browser.open("http://127.0.0.1:4200/runs/flow-run/<id>")
        page.wait_for_text("Completed", "aggregate")
        page.screenshot(path)
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    explicit = os.environ.get("MONOLM_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).exists() else shutil.which(explicit)
    return next((path for path in map(shutil.which, CANDIDATES) if path), None)


def ensure_chromium() -> str:
    """The Chromium binary; installed from Debian's packages (root, apt-get) when there is none.
    Raises RuntimeError, saying why, when that is impossible."""
    found = find_chromium()
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RuntimeError("chromium is not installed and cannot be installed here (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-1000:]}")
    found = find_chromium()
    if not found:
        raise RuntimeError("apt-get installed chromium, but no chromium binary is on PATH")
    return found


class Page:
    """One tab, over its own DevTools websocket."""

    def __init__(self, ws_url: str, width: int, height: int) -> None:
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None, open_timeout=30)
        self.ids = itertools.count(1)
        self.call("Page.enable")
        self.call("Runtime.enable")
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 60) -> dict[str, Any]:
        """Send one command and return its result (events arriving meanwhile are dropped)."""
        ident = next(self.ids)
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.ws.recv(timeout=max(deadline - time.monotonic(), 0.1)))
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def goto(self, url: str) -> None:
        self.call("Page.navigate", {"url": url})

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        return result.get("result", {}).get("value")

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for(self, expression: str, timeout: float = 60, what: str = "") -> Any:
        """Poll a JavaScript expression until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"page never showed {what or expression} within {timeout:.0f} s")
            time.sleep(0.5)

    def wait_for_text(self, *needles: str, timeout: float = 60) -> str:
        """Wait until the page's visible text contains every needle (a str or a regex pattern
        prefixed `re:`); the text then."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            missing = [n for n in needles if not _contains(text, n)]
            if not missing:
                return text
            if time.monotonic() > deadline:
                raise TimeoutError(f"page never showed {missing} within {timeout:.0f} s; it shows:\n{text[:3000]}")
            time.sleep(0.5)

    def screenshot(self, path: str | Path, full_page: bool = True) -> Path:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.call("Page.getLayoutMetrics")["cssContentSize"]
            params.update(
                captureBeyondViewport=True,
                clip={"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 12000), "scale": 1},
            )
        data = self.call("Page.captureScreenshot", params)["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()


def _contains(text: str, needle: str) -> bool:
    return bool(re.search(needle[3:], text)) if needle.startswith("re:") else needle in text


class Browser:
    """A headless Chromium process with a private profile, stopped (its process group) on exit."""

    def __init__(self, proc: subprocess.Popen, port: int, profile: str, width: int, height: int) -> None:
        self.proc, self.port, self.profile = proc, port, profile
        self.width, self.height = width, height
        self.pages: list[Page] = []

    @classmethod
    @contextlib.contextmanager
    def launch(cls, width: int = 1440, height: int = 1000, timeout: float = 60) -> Iterator[Browser]:
        binary = ensure_chromium()
        profile = tempfile.mkdtemp(prefix="monolm-chromium-")
        args = [
            binary,
            "--headless=new",
            "--no-sandbox",  # root in a container: Chromium's sandbox needs user namespaces
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--hide-scrollbars",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        browser = None
        try:
            port = _devtools_port(proc, profile, timeout)
            browser = cls(proc, port, profile, width, height)
            yield browser
        finally:
            if browser is not None:
                for page in browser.pages:
                    page.close()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            shutil.rmtree(profile, ignore_errors=True)

    def open(self, url: str) -> Page:
        """A new tab showing `url`."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/json/new?about:blank", method="PUT")
        with urllib.request.urlopen(request, timeout=30) as resp:
            target = json.loads(resp.read())
        page = Page(target["webSocketDebuggerUrl"], self.width, self.height)
        self.pages.append(page)
        page.goto(url)
        return page


def _devtools_port(proc: subprocess.Popen, profile: str, timeout: float) -> int:
    """The port Chromium chose, from the DevToolsActivePort file of its profile."""
    active = Path(profile) / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(active.read_text().splitlines()[0])
        time.sleep(0.2)
    raise TimeoutError(f"chromium did not open its DevTools port within {timeout:.0f} s")
