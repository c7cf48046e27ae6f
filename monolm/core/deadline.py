"""A stage's own deadline (`runner.stage_timeout_minutes`), checked between units of work.

Why: an orchestrator's timeout raises in the stage's thread "at the next Python instruction",
which on a busy machine may land late or never, and the stage runs on and writes its manifest.
The stage itself therefore checks its deadline between training steps, attack sweeps and blocks
and evaluation batches (`check_deadline`), and once more before it writes its manifest, and stops
with `StageTimeout`: a timed-out stage never finishes, whatever the orchestrator does.

The deadline lives in a context variable set by whoever starts the stage (`stage_deadline`: the
task wrapper, the sequential runner), so library functions need no extra parameter and a
notebook call without a deadline never times out.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator
from dataclasses import dataclass


class StageTimeout(TimeoutError):
    """A stage ran past `runner.stage_timeout_minutes` and stopped; it wrote no manifest. A
    TimeoutError, so an orchestrator records the run as timed out (Prefect: `TimedOut`)."""


@dataclass(frozen=True)
class Deadline:
    stage: str
    minutes: float
    at: float  # time.monotonic() after which the stage must stop

    def check(self, where: str) -> None:
        if time.monotonic() > self.at:
            seconds = self.minutes * 60
            raise StageTimeout(
                f"stage {self.stage} exceeded timeout of {seconds:g} second(s) "
                f"(runner.stage_timeout_minutes.{self.stage}={self.minutes:g}); it stopped {where} "
                "and wrote no manifest (a re-run resumes from its last checkpoint or finished unit)"
            )


_CURRENT: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar("monolm_stage_deadline", default=None)


@contextlib.contextmanager
def stage_deadline(stage: str, minutes: float | None) -> Iterator[Deadline | None]:
    """Run the body under `stage`'s deadline, `minutes` from now (None: no deadline)."""
    deadline = None if not minutes else Deadline(stage, minutes, time.monotonic() + minutes * 60)
    token = _CURRENT.set(deadline)
    try:
        yield deadline
    finally:
        _CURRENT.reset(token)


def check_deadline(where: str = "between units of work") -> None:
    """Raise `StageTimeout` if the running stage is past its deadline (cheap: call it often)."""
    deadline = _CURRENT.get()
    if deadline is not None:
        deadline.check(where)
