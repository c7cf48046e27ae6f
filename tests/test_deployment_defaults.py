"""Deployments default to the tiny preset on the local profile (issue 21): a real model (preset
full or quick) on a deployment run needs profile=slurm, or an explicit profile=local that the run
logs as a warning; `monolm run` (no deployment) is the user's own choice and is not checked."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("prefect")

from flows.experiment import check_deployment_size  # noqa: E402
from monolm.config import ConfigError, load_config  # noqa: E402

pytestmark = pytest.mark.security
LOG = logging.getLogger("test.deployment")
DEPLOYMENT = "b1e7c1d0-0000-4000-8000-000000000042"  # a flow run's deployment id


def test_every_deployment_defaults_to_tiny_on_the_local_profile():
    from deployments.serve import deployment_specs

    for spec in deployment_specs():
        params = spec["parameters"]
        if params.get("nightly"):
            continue  # deploy-time choice (MONOLM_NIGHTLY_*), checked by the same rule at run time
        assert params.get("preset") == "tiny", spec["name"]
        assert not params.get("profile") and not params.get("config_file"), spec["name"]
        cfg = load_config(params["preset"])
        assert cfg.runner.profile == "local" and cfg.model.source == "tiny"


def test_the_full_preset_on_a_deployment_needs_slurm_or_an_explicit_local(caplog):
    full = load_config("full")
    with pytest.raises(ConfigError, match="profile: preset full trains .*needs profile=slurm"):
        check_deployment_size(full, None, DEPLOYMENT, LOG)
    with pytest.raises(ConfigError, match="profile: preset quick"):
        check_deployment_size(load_config("quick"), None, DEPLOYMENT, LOG)
    slurm = load_config("full", sets=["runner.profile=slurm", "paths.store_url=postgresql+psycopg://u@db/monolm"])
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        check_deployment_size(slurm, None, DEPLOYMENT, LOG)  # a site file's profile counts
        check_deployment_size(slurm, "slurm", DEPLOYMENT, LOG)
        assert caplog.records == []
        check_deployment_size(full, "local", DEPLOYMENT, LOG)  # explicit: runs, with a warning
    (warning,) = caplog.records
    assert warning.levelno == logging.WARNING and "profile=local" in warning.getMessage()
    check_deployment_size(full, None, None, LOG)  # `monolm run --preset full`: no deployment
    check_deployment_size(load_config("tiny"), None, DEPLOYMENT, LOG)


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_backend")
def test_a_deployment_run_of_the_full_preset_without_a_profile_fails_before_any_compute(tmp_path, monkeypatch):
    from flows.experiment import experiment

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__ID", DEPLOYMENT)  # as inside a deployment's flow run
    with pytest.raises(ConfigError, match="needs profile=slurm"):
        experiment(preset="full", seeds=[42])
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()
