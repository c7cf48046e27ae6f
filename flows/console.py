"""The console of `monolm run` under Prefect: a failure a user caused or can act on (a permanent
error, a stage stopped by the disk, stages that failed) is one line with its cause, not a
traceback. The traceback still reaches the run's logs in the API (the UI), because only the
console handler's formatter leaves it out."""

from __future__ import annotations

import logging

from monolm.core.errors import chain, is_permanent

# Errors whose message says everything a user needs (by class name: their modules load lazily).
USER_FACING = {"StageFailed", "StagesFailed", "ModelError", "ModelUnavailable", "DataError"}


def user_facing(exc: BaseException | None) -> bool:
    return is_permanent(exc) or any(type(e).__name__ in USER_FACING for e in chain(exc))


class NoUserTracebacks(logging.Formatter):
    """Wraps a console formatter: records whose exception is user-facing are formatted without it."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        if not (record.exc_info and user_facing(record.exc_info[1])):
            return self.inner.format(record)
        saved = record.exc_info, record.exc_text
        record.exc_info, record.exc_text = None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text = saved


def hide_user_tracebacks() -> None:
    """Install `NoUserTracebacks` on every console handler of the root logger (Prefect's included)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler.formatter, NoUserTracebacks):
            handler.setFormatter(NoUserTracebacks(handler.formatter or logging.Formatter()))
