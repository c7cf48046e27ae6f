"""Progress of long stages, told without an orchestrator: a log line per unit of work, and an event
for the stage's `on_log` callback.

Events are dicts with `kind` "progress" (attacks, evaluation), "train" or "eval" (training's
history entries). Every event that measures progress carries `fraction` (0..1 of its stage),
`eta_s` (seconds left, None until a rate is known) and `message` (the log line). The tasks layer
turns them into Prefect progress artifacts; without Prefect they are only log lines.

A stage made of parts (an attack on two arms, evaluation of three models) reports each part with
`part_callback`, which rescales the part's fraction into the stage's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

OnLog = Callable[[dict[str, Any]], None]


def format_eta(seconds: float | None) -> str:
    """`1h02m`, `3m05s`, `42s`, or `?` while unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def eta_seconds(done: float, total: float, elapsed: float, done_at_start: float = 0.0) -> float | None:
    """Seconds left at the rate of this call's work (`done - done_at_start` in `elapsed`); work
    reused from disk (a resumed run) does not count as speed."""
    if done >= total:
        return 0.0
    worked = done - done_at_start
    if worked <= 0 or elapsed <= 0:
        return None
    return max(total - done, 0) * elapsed / worked


class Progress:
    """Counts the units of one task (`total` of them): `update` logs a line with the time left and
    tells `on_log`. Units reused from disk (`reused=True`) count as done but not as speed."""

    def __init__(
        self, total: int, *, log: logging.Logger | logging.LoggerAdapter, on_log: OnLog | None = None, what: str = ""
    ) -> None:
        self.total, self.log, self.on_log, self.what = max(int(total), 1), log, on_log, what
        self.done = 0
        self.reused = 0
        self.started = time.monotonic()

    def update(self, done: int, message: str, *, reused: bool = False, **fields: Any) -> None:
        """`done` of `total` units are finished; `message` says where and how it went."""
        if reused:
            self.reused += max(done - self.done, 0)
        self.done = min(done, self.total)
        eta = eta_seconds(self.done, self.total, time.monotonic() - self.started, self.reused)
        line = f"{message}, ETA {format_eta(eta)}"
        self.log.info("%s", line)
        emit(self.on_log, what=self.what, done=self.done, total=self.total, eta_s=eta, message=line, **fields)


def emit(on_log: OnLog | None, **event: Any) -> None:
    """Send a progress event (fraction = done/total unless given) to `on_log`, if there is one."""
    if on_log is None:
        return
    if "fraction" not in event:
        event["fraction"] = min(max(event["done"] / max(event["total"], 1), 0.0), 1.0)
    on_log({"kind": "progress", **event})


def part_callback(on_log: OnLog | None, index: int, count: int, label: str) -> OnLog | None:
    """`on_log` for part `index` of `count` of a stage: fractions become the stage's, and the
    part's `label` (e.g. the arm) is recorded as `part`; `eta_s` stays the part's. None stays None."""
    if on_log is None:
        return None

    def forward(event: dict[str, Any]) -> None:
        event = dict(event)
        if event.get("fraction") is not None:
            event["fraction"] = (index + float(event["fraction"])) / count
        event.setdefault("part", label)
        on_log(event)

    return forward


class _Labelled(logging.LoggerAdapter):
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"{self.extra['label']}: {msg}", kwargs


def labelled(log: logging.Logger, label: str) -> logging.LoggerAdapter:
    """`log` with every message prefixed by `label` (e.g. the arm an attack runs on), so that the
    lines of a stage's parts can be told apart."""
    return _Labelled(log, {"label": label})
