"""Console logging for the `monolm` logger tree. Kept apart from `monolm.runtime` (which imports
torch) so that the command line can report a bad config before torch is loaded."""

from __future__ import annotations

import logging


def setup_logging(level: int = logging.INFO) -> None:
    log = logging.getLogger("monolm")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(level)
