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
def restore_process_state():
    """Tests that call the command line in-process (`flows.cli.main`) get its process-wide
    settings: `-q`'s progress-bar switches in the environment (which child processes inherit) and
    the `monolm` logger's console handler. Put both back after every test, so one test's settings
    never reach the next test or its children."""
    import logging

    saved_env = dict(os.environ)
    lib = logging.getLogger("monolm")
    saved_log = (lib.level, lib.propagate, list(lib.handlers))
    yield
    os.environ.clear()
    os.environ.update(saved_env)
    lib.setLevel(saved_log[0])
    lib.propagate = saved_log[1]
    lib.handlers[:] = saved_log[2]
