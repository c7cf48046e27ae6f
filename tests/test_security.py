"""Shared-cluster safety checks that need no server (issue 21); the ones with a server are in
tests/test_service.py and tests/test_infra_scripts.py (marked `security` too)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.security


# ----------------------------------------------------------------------------- the work pool
def test_pool_template_lets_no_flow_run_choose_command_env_or_folder():
    import jsonschema

    from infra.pool_template import REMOVED, locked_template

    template = locked_template()
    assert not set(REMOVED) & set(template["job_configuration"])
    assert not set(REMOVED) & set(template["variables"]["properties"])
    schema = template["variables"]
    jsonschema.validate({"name": "x", "stream_output": False}, schema)  # harmless ones stay
    for job_variables in ({"command": "sh -c 'id'"}, {"env": {"LD_PRELOAD": "x.so"}}, {"working_dir": "/"}, {"x": 1}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(job_variables, schema)


# ----------------------------------------------------------------------------- SLURM jobs
def test_slurm_job_script_never_holds_the_api_auth_string(monkeypatch):
    """The auth string reaches SLURM jobs through sbatch's environment, never the job script
    (which dask-jobqueue writes to a file and SLURM keeps, readable by administrators)."""
    from infra.profiles import slurm_cluster_kwargs
    from monolm.config import load_config

    secret = "monolm:" + "5e" * 24
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", secret)
    cfg = load_config("tiny", config_file="infra/slurm/site-local.yaml", sets=["runner.profile=slurm"])
    kwargs = slurm_cluster_kwargs(cfg.runner.slurm, "http://127.0.0.1:4200/api")
    assert secret not in repr(kwargs) and "5e5e5e" not in repr(kwargs)
    assert any("PREFECT_API_URL" in line for line in kwargs["job_script_prologue"])
