"""Console logging for the `monolm` logger tree, where its records go while an orchestrator
runs a stage, and `-q`'s silence. Kept apart from `monolm.core.runtime` (which imports torch) so
that the command line can report a bad config before torch is loaded.

One handler, on the `monolm` logger, which then does not propagate: a record is written once
(the CLI's `setup_logging`). A thread that runs a stage under an orchestrator (a Prefect task)
hands its records to a sink of its own (`route_thread`), which shows them in the task run's logs
and, through the orchestrator's console handler, once on the console; meanwhile every other
record is written to stderr here. Lines are written
with `tqdm.write`, so a progress bar on the same terminal is redrawn below them, not broken."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator

LOGGER = "monolm"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

Sink = Callable[[logging.LogRecord], None]
_sinks: dict[int, Sink] = {}
_sinks_lock = threading.Lock()

# Read by huggingface_hub (and so transformers: "Loading weights", "Writing model shards"),
# datasets and tqdm itself when they are imported; worker processes inherit them.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}


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


def _console_handler(log: logging.Logger) -> ConsoleHandler | None:
    return next((h for h in log.handlers if isinstance(h, ConsoleHandler)), None)


def _install(log: logging.Logger) -> ConsoleHandler:
    handler = ConsoleHandler()
    handler.setFormatter(logging.Formatter(FORMAT, "%H:%M:%S"))
    log.addHandler(handler)
    return handler


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """For a program's entry point (the CLI): install the console handler on the `monolm` logger
    (once) and stop propagation to the root logger, whose handlers (e.g. Prefect's console
    handler) would print every line a second time."""
    log = logging.getLogger(LOGGER)
    if _console_handler(log) is None:
        _install(log)
    log.propagate = False
    log.setLevel(level)
    return log


_routing = {"threads": 0, "propagate": True, "installed": None}


@contextlib.contextmanager
def route_thread(sink: Sink) -> Iterator[None]:
    """Hand the current thread's `monolm` records to `sink` (instead of the console) while inside.
    Other threads' records are written once by the console handler meanwhile: while any thread
    routes, the `monolm` logger has that handler and does not propagate; when the last one leaves,
    the logger is as it was (a process that never called `setup_logging` propagates again)."""
    log = logging.getLogger(LOGGER)
    ident = threading.get_ident()
    with _sinks_lock:
        if _routing["threads"] == 0:
            _routing["propagate"] = log.propagate
            _routing["installed"] = None if _console_handler(log) else _install(log)
            log.propagate = False
        _routing["threads"] += 1
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
            _routing["threads"] -= 1
            if _routing["threads"] == 0:
                log.propagate = bool(_routing["propagate"])
                if _routing["installed"] is not None:
                    log.removeHandler(_routing["installed"])
                    _routing["installed"] = None


def quiet_progress_bars() -> None:
    """No progress bars from monolm, transformers, huggingface_hub or datasets in this process and
    in the processes it starts (stage workers): set the switches they read at import, and flip
    them in the libraries this process has already imported."""
    os.environ.update(QUIET_ENV)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()
