"""Errors that no retry can fix, and the one line that says why a run failed.

A retry helps a stage that met a passing problem (a lost worker, a 502 from the hub). It cannot
help one whose configuration is wrong, whose model is not cached on an offline machine or whose
corpus is unreadable: retrying those only delays the answer by the retry delays and repeats the
traceback. Such errors derive from `PermanentError`; the orchestrator's retry condition
(`tasks.common.retry_unless_permanent`) looks for it anywhere in the exception's chain."""

from __future__ import annotations

import os
from collections.abc import Iterator


class PermanentError(Exception):
    """Mixin: an error that fails the same way on every retry (configuration, a model that does not
    exist or is not cached offline, a missing or unreadable file)."""


def chain(exc: BaseException | None) -> Iterator[BaseException]:
    """`exc`, then its causes and contexts (each once)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_permanent(exc: BaseException | None) -> bool:
    """Whether retrying what raised `exc` cannot succeed."""
    return any(isinstance(e, PermanentError) for e in chain(exc))


def cause_text(exc: BaseException) -> str:
    """The message of the innermost permanent error in the chain (the cause a user acts on), or
    `exc`'s own message; prefixed by its type only when the message is empty."""
    permanent = [e for e in chain(exc) if isinstance(e, PermanentError)]
    chosen = permanent[-1] if permanent else exc
    return str(chosen).strip() or type(chosen).__name__


def hub_offline() -> bool:
    """Whether Hugging Face is told never to contact the hub (`HF_HUB_OFFLINE=1`): then a model or
    dataset missing from the local cache is a permanent error."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
