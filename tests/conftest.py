"""Shared fixtures: the test environment (offline, one torch thread) and an isolated Prefect backend
for flow tests. Shared helpers (the `micro` configuration, a tiny GPT-NeoX) live in `helpers.py`."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MONOLM_TORCH_THREADS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def prefect_backend():
    """A temporary Prefect database and server for the whole session (real API, real states)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(autouse=True)
def restore_environment():
    """Tests that call the command line in-process (`flows.cli.main`) get its process-wide
    settings, e.g. `-q`'s progress-bar switches, which child processes inherit: put the
    environment back after every test so one test's flags never reach the next one's children."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
