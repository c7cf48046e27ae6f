"""Fixtures of the resilience suite; the machinery is in `helpers`."""

from __future__ import annotations

from pathlib import Path

import pytest

from resilience.helpers import micro_argv, run_cli
from resilience.trainruns import finish


@pytest.fixture(scope="session")
def micro_pipeline(tmp_path_factory) -> Path:
    """A finished micro pipeline (stages 0-6, seed 42) built by the real CLI, read-only for tests
    (tests that damage files copy nothing from it; they build their own where needed)."""
    root = tmp_path_factory.mktemp("pipeline")
    code, out = run_cli(micro_argv(root), cwd=root)
    assert code == 0, out[-6000:]
    return root


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """The uninterrupted run of each arm, in its own process."""
    runs: dict[bool, Path] = {}

    def get(constrained: bool) -> Path:
        if constrained not in runs:
            out = tmp_path_factory.mktemp("reference") / ("constrained" if constrained else "baseline")
            result, _ = finish(out, constrained=constrained)
            assert result["resumed_from"] is None
            runs[constrained] = out
        return runs[constrained]

    return get
