"""Console logging for the `monolm` logger tree, and where its records go while an orchestrator
runs a stage. Kept apart from `monolm.runtime` (which imports torch) so that the command line can
report a bad config before torch is loaded.

One handler, on the `monolm` logger, which does not propagate: a record is written once. A thread
that runs a stage under an orchestrator (a Prefect task) hands its records to a sink of its own
(`route_thread`), which shows them in the task run's logs and, through the orchestrator's console
handler, once on the console; every other record is written to stderr here. Lines are written
with `tqdm.write`, so a progress bar on the same terminal is redrawn below them, not broken."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Callable, Iterator

LOGGER = "monolm"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

Sink = Callable[[logging.LogRecord], None]
_sinks: dict[int, Sink] = {}
_sinks_lock = threading.Lock()


class ConsoleHandler(logging.Handler):
    """Writes a record to stderr, unless its thread routes records elsewhere (`route_thread`)."""

    def emit(self, record: logging.LogRecord) -> None:
        sink = _sinks.get(record.thread)
        if sink is not None:
            try:
                sink(record)
                return
            except Exception:  # a failing sink must not lose the line: write it here instead
                pass
        try:
            message = self.format(record)
            from tqdm import tqdm

            tqdm.write(message, file=sys.stderr)
        except Exception:
            self.handleError(record)


def setup_logging(level: int | None = logging.INFO) -> logging.Logger:
    """Install the console handler on the `monolm` logger (once) and stop propagation to the root
    logger, whose handlers (e.g. Prefect's console handler) would print every line a second time.
    `level` None keeps the current level, or INFO if none is set."""
    log = logging.getLogger(LOGGER)
    if not any(isinstance(h, ConsoleHandler) for h in log.handlers):
        handler = ConsoleHandler()
        handler.setFormatter(logging.Formatter(FORMAT, "%H:%M:%S"))
        log.addHandler(handler)
    log.propagate = False
    if level is not None:
        log.setLevel(level)
    elif log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    return log


@contextlib.contextmanager
def route_thread(sink: Sink) -> Iterator[None]:
    """Hand the current thread's `monolm` records to `sink` (instead of the console) while inside.
    Other threads are unaffected; nesting restores the outer sink."""
    setup_logging(None)
    ident = threading.get_ident()
    with _sinks_lock:
        previous = _sinks.get(ident)
        _sinks[ident] = sink
    try:
        yield
    finally:
        with _sinks_lock:
            if previous is None:
                _sinks.pop(ident, None)
            else:
                _sinks[ident] = previous
