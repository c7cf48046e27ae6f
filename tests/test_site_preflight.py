"""The site checks before a run (issue 24): only models whose stage 0 is still to run are checked
(a fully set-up study runs offline), a failed hub probe alone does not stop a run, and the error
is permanent and carries every failed check with its next step."""

from __future__ import annotations

import pytest

from monolm.config import load_config
from monolm.core.errors import is_permanent
from monolm.study import site_preflight as preflight
from monolm.study.dry_run import Execution
from monolm.study.site_checks import Check


def _cfg(tmp_path):
    return load_config("quick", sets=[f"paths.runs_root={tmp_path / 'runs'}", "seeds=[1, 2]"])


def test_a_model_whose_stage_0_is_done_for_every_seed_is_not_checked(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    model = cfg.model.slug
    done = [Execution(f"{model}/shared", seed, "setup", True) for seed in (1, 2)]
    monkeypatch.setattr(preflight, "plan_study", lambda cfg, last: done)
    monkeypatch.setattr(preflight, "run_checks", lambda cfg, timeout: pytest.fail("checked a set-up model"))
    assert preflight.models_to_set_up(cfg) == [] and preflight.site_preflight(cfg) == []
    half = [done[0], Execution(f"{model}/shared", 2, "setup", False)]
    monkeypatch.setattr(preflight, "plan_study", lambda cfg, last: half)
    assert [c.model.name for c in preflight.models_to_set_up(cfg)] == [cfg.model.name]


def test_failures_stop_the_run_with_every_cause_and_next_step(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    checks = [
        Check("hub reachable", False, "cannot connect", "check the network"),
        Check("model config loadable", True, "gpt_neox"),
        Check("dataset readable", False, "streamed from the hub; HF_HUB_OFFLINE is set", "use a local copy"),
    ]
    monkeypatch.setattr(preflight, "run_checks", lambda cfg, timeout: checks)
    with pytest.raises(preflight.SiteCheckError) as err:
        preflight.site_preflight(cfg)
    text = str(err.value)
    assert is_permanent(err.value)  # never retried
    assert "FAIL dataset readable: streamed from the hub" in text and "next: use a local copy" in text
    assert "hub reachable" not in text  # a cached model and local data need no hub
    monkeypatch.setattr(preflight, "run_checks", lambda cfg, timeout: checks[:2])
    assert preflight.site_preflight(cfg) == checks[:2]  # only the hub probe failed: the run goes on
