"""Console logging for the `monolm` logger tree, and `-q`'s silence. Kept apart from
`monolm.runtime` (which imports torch) so that the command line can report a bad config before
torch is loaded."""

from __future__ import annotations

import logging
import os
import sys

# Read by huggingface_hub (and so transformers: "Loading weights", "Writing model shards"),
# datasets and tqdm itself when they are imported; worker processes inherit them.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}


def setup_logging(level: int = logging.INFO) -> None:
    log = logging.getLogger("monolm")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(level)


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
