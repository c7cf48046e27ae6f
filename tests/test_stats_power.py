"""Minimum detectable effect and sample size of the paired t-test (issue 23 item 4), checked
against closed forms of the power calculation on synthetic data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from monolm.stats import describe_difference, paired_test
from monolm.stats_power import mde_paired, n_for_effect, power_paired


def _closed_form_power(effect, sd, n, alpha=0.05):
    """The textbook formula: T ~ noncentral t(n-1, effect*sqrt(n)/sd), two-sided rejection."""
    df, nc = n - 1, effect * math.sqrt(n) / sd
    crit = stats.t.ppf(1 - alpha / 2, df)
    return stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc)


def test_power_matches_the_closed_form():
    for effect, sd, n in ((0.2, 1.0, 30), (0.5, 0.3, 5), (1.0, 2.0, 12)):
        assert power_paired(effect, sd, n) == pytest.approx(_closed_form_power(effect, sd, n), abs=1e-12)


def test_power_matches_statsmodels_when_installed():
    statsmodels = pytest.importorskip("statsmodels.stats.power")
    assert power_paired(0.5, 1.0, 20) == pytest.approx(
        statsmodels.TTestPower().power(effect_size=0.5, nobs=20, alpha=0.05), abs=1e-9
    )


def test_mde_of_synthetic_differences_has_80_percent_power_and_approaches_the_normal_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(5.0, 1.0, 40)
    b = a - rng.normal(0.1, 0.4, 40)
    result = paired_test(a, b)
    sd = float(np.std(a - b, ddof=1))
    assert result["mde"] == pytest.approx(mde_paired(sd, 40))
    assert _closed_form_power(result["mde"], sd, 40) == pytest.approx(0.8, abs=1e-6)
    # for large n the t-based MDE tends to the normal formula (z_{1-α/2} + z_{power}) · sd / sqrt(n)
    normal = (stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) * 1.0 / math.sqrt(10_000)
    assert mde_paired(1.0, 10_000) == pytest.approx(normal, rel=1e-3)


def test_two_seeds_have_a_huge_mde():
    assert mde_paired(1.0, 2) > 10 * mde_paired(1.0, 10)


def test_n_for_effect_is_the_first_n_the_formula_gives_80_percent_power():
    for effect, sd in ((0.1, 0.4), (0.3, 1.0), (1.0, 0.5)):
        n = n_for_effect(effect, sd)
        assert _closed_form_power(effect, sd, n) >= 0.8
        assert n == 2 or _closed_form_power(effect, sd, n - 1) < 0.8


def test_a_non_significant_sentence_states_its_mde():
    rng = np.random.default_rng(1)
    a = rng.normal(0, 1, 8)
    result = paired_test(a, a + rng.normal(0, 1, 8))
    assert not result["significant"]
    sentence = describe_difference("monotonic", "baseline", "loss", result, unit="texts")
    assert f"±{result['mde']:.3g}" in sentence and "80% power" in sentence


def _store_run(url: str, sd_texts: float, n_texts: int) -> None:
    """A completed tiny run whose within-seed UAT test had differences of sd `sd_texts`."""
    from monolm.store import ResultsStore

    half = stats.t.ppf(0.975, n_texts - 1) * sd_texts / math.sqrt(n_texts)
    extra = {"n": n_texts, "scope": "texts", "ci": [0.1 - half, 0.1 + half], "significant": False, "test": "t"}
    with ResultsStore(url) as store:
        store.record_run(
            {"run_id": "r1", "run_name": "earlier", "preset": "tiny", "variant": "mlp_in", "status": "completed"},
            [
                {
                    "seed": 42,
                    "arm": "monotonic-baseline",
                    "stage": "uat",
                    "metric": "abs_increase:diff",
                    "value": 0.1,
                    "extra": extra,
                }
            ],
        )


def test_plan_takes_the_sd_of_the_latest_comparable_run_and_gives_the_formulas_n(tmp_path):
    from monolm.config import load_config
    from monolm.study import power_plan

    url = f"sqlite:///{tmp_path / 'results.sqlite'}"
    _store_run(url, 0.3, 24)
    cfg = load_config("tiny", sets=[f"paths.store_url={url}"])
    name, rows = power_plan.latest_comparable(cfg)
    assert name == "earlier"
    table = power_plan.power_rows(cfg, power_plan.observed_sds(rows), f"run {name}", target=0.1)
    uat = next(r for r in table if r.stage == "uat" and r.unit == "texts")
    assert uat.sd == pytest.approx(0.3) and uat.source == "run earlier"
    assert uat.mde == pytest.approx(mde_paired(0.3, cfg.attacks.uat.n_eval_texts))
    assert uat.n_for_target == n_for_effect(0.1, 0.3)
    defaults = [r for r in table if r.source == "stated default"]
    assert defaults and all(r.n_for_target == n_for_effect(0.1, r.sd) for r in defaults)


def test_monolm_plan_target_effect_prints_the_n_the_formula_gives(tmp_path):
    from tests.test_cli import monolm

    url = f"sqlite:///{tmp_path / 'results.sqlite'}"
    _store_run(url, 0.3, 24)
    out = monolm("plan", "--preset", "tiny", "--set", f"paths.store_url={url}", "--target-effect", "0.1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("UAT: absolute loss increase, one seed"))
    assert line.split()[-3] == str(n_for_effect(0.1, 0.3)) and line.endswith("run earlier")
    assert f"{mde_paired(0.3, 24):.3g}" in line
