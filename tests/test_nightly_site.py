"""A nightly that works where it runs (issue 15): the deploying user's preset, profile and site
file reach the flow as deployment parameters (unset ones as empty text), and `monolm verify` at the
start of every run (issue 24: not only the nightly's) fails it within seconds, naming what cannot
be reached and what to do, before any stage."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.usefixtures("prefect_backend")


@pytest.mark.parametrize("nightly", [True, False], ids=["nightly", "any-deployment-run"])
def test_run_fails_early_and_clearly_when_model_or_data_cannot_be_reached(tmp_path, monkeypatch, nightly):
    from flows.experiment import experiment

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub cannot be reached
    sets = [f"paths.runs_root={tmp_path / 'runs'}", f"paths.results_root={tmp_path / 'results'}"]
    started = time.monotonic()
    # profile and config_file as a deployment passes them when MONOLM_NIGHTLY_PROFILE/CONFIG are unset.
    state = experiment(preset="quick", overrides=sets, nightly=nightly, profile="", config_file="", return_state=True)
    elapsed = time.monotonic() - started
    assert state.is_failed()
    message = state.message
    assert "stopped before stage 0" in message and "monolm verify --preset quick" in message, message
    assert "model config loadable" in message and "EleutherAI/pythia-1.4b" in message, message
    assert "next: " in message and "data.source=local" in message, message  # the state message says what to do
    assert elapsed < 90, f"took {elapsed:.0f} s to fail"
    # No stage started: nothing was written under the runs root.
    assert not list((tmp_path / "runs").glob("quick/*"))
