"""Statistics checked against hand formulas: t-table quantiles, closed-form t CDFs for small df,
and the exact Wilcoxon null distribution enumerated over all sign patterns."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from monolm.stats import bootstrap_ci, describe_difference, is_significant, paired_test, summarize

T_975_DF4 = 2.776445105  # t table: two-sided 95%, 4 degrees of freedom


def _t_p_df2(t: float) -> float:
    """Two-sided p of Student's t with 2 df: the CDF is 1/2 + t / (2 sqrt(2 + t^2))."""
    return 1 - abs(t) / math.sqrt(2 + t * t)


def _t_p_df1(t: float) -> float:
    """Two-sided p with 1 df (the Cauchy distribution): 1 - (2/pi) atan|t|."""
    return 1 - 2 / math.pi * math.atan(abs(t))


def _wilcoxon_exact_p(d: list[float]) -> float:
    """P(min(R+, R-) <= observed) over all 2^n equally likely sign patterns (no ties, no zeros)."""
    ranks = {abs(x): r for r, x in enumerate(sorted(d, key=abs), start=1)}
    total = sum(ranks.values())
    r_plus = sum(ranks[abs(x)] for x in d if x > 0)
    observed = min(r_plus, total - r_plus)
    hits = 0
    for signs in itertools.product((0, 1), repeat=len(d)):
        rp = sum(r for s, r in zip(signs, ranks.values(), strict=True) if s)
        hits += min(rp, total - rp) <= observed
    return hits / 2 ** len(d)


# --------------------------------------------------------------------------- summarize
def test_summarize_five_seeds_by_hand():
    s = summarize([1.0, 2.0, 3.0, 4.0, 5.0])
    std = math.sqrt(sum((x - 3) ** 2 for x in range(1, 6)) / 4)  # sqrt(2.5)
    sem = std / math.sqrt(5)
    assert (s["n"], s["mean"]) == (5, 3.0)
    assert s["std"] == pytest.approx(std) and s["sem"] == pytest.approx(sem)
    assert s["ci_low"] == pytest.approx(3 - T_975_DF4 * sem, rel=1e-8)
    assert s["ci_high"] == pytest.approx(3 + T_975_DF4 * sem, rel=1e-8)
    assert s["ci_low"] == pytest.approx(1.037, abs=1e-3) and s["ci_high"] == pytest.approx(4.963, abs=1e-3)
    assert s["reason"] is None


def test_summarize_other_confidence_is_wider():
    assert summarize([1, 2, 3, 4, 5], confidence=0.99)["ci_high"] > summarize([1, 2, 3, 4, 5])["ci_high"]


def test_summarize_degenerate_cases():
    one = summarize([7.5])
    assert one["n"] == 1 and one["mean"] == 7.5
    assert one["std"] is one["ci_low"] is one["ci_high"] is None
    assert "n=1" in one["reason"]
    empty = summarize([])
    assert empty["n"] == 0 and empty["mean"] is None and empty["reason"]
    same = summarize([2.0, 2.0, 2.0])
    assert (same["std"], same["ci_low"], same["ci_high"]) == (0.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="NaN"):
        summarize([1.0, float("nan")])


# --------------------------------------------------------------------------- bootstrap
def test_bootstrap_is_deterministic_and_sensible():
    values = np.random.default_rng(0).normal(10.0, 2.0, size=400)
    a = bootstrap_ci(values, seed=7, n_resamples=2000)
    assert a == bootstrap_ci(values, seed=7, n_resamples=2000)
    assert a != bootstrap_ci(values, seed=8, n_resamples=2000)
    low, high = a
    assert low < values.mean() < high
    # for a large normal sample the bootstrap and t intervals agree closely
    t = summarize(values)
    assert high - low == pytest.approx(t["ci_high"] - t["ci_low"], rel=0.1)
    p_low, p_high = bootstrap_ci(values, seed=7, n_resamples=2000, method="percentile")
    assert p_low == pytest.approx(low, abs=0.05) and p_high == pytest.approx(high, abs=0.05)
    narrow = bootstrap_ci(values, seed=7, n_resamples=2000, confidence=0.5)
    assert low < narrow[0] < narrow[1] < high


def test_bootstrap_degenerate():
    assert bootstrap_ci([3.0], seed=0) is None
    assert bootstrap_ci([2.0, 2.0, 2.0], seed=0) == (2.0, 2.0)


# --------------------------------------------------------------------------- paired tests
def test_paired_test_three_pairs_by_hand():
    a, b = [5.0, 7.0, 9.5], [4.0, 5.0, 6.0]
    d = [1.0, 2.0, 3.5]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    t = mean / (sd / math.sqrt(3))
    r = paired_test(a, b)
    assert r["n"] == 3
    assert r["mean_diff"] == pytest.approx(mean)
    assert r["t_stat"] == pytest.approx(t)
    assert r["t_p"] == pytest.approx(_t_p_df2(t), rel=1e-8)
    assert r["t_p"] == pytest.approx(0.0964, abs=1e-4)
    assert r["wilcoxon_p"] == pytest.approx(_wilcoxon_exact_p(d)) == pytest.approx(0.25)
    assert r["significant"] is False
    assert r["test_names"] == {"t": "paired t-test", "wilcoxon": "Wilcoxon signed-rank test"}
    # direction: b - a flips the sign and keeps p
    flipped = paired_test(b, a)
    assert flipped["mean_diff"] == pytest.approx(-mean) and flipped["t_p"] == pytest.approx(r["t_p"])


def test_paired_test_two_pairs_cauchy():
    r = paired_test([3.0, 5.0], [1.0, 2.0])  # d = [2, 3]
    t = 2.5 / (math.sqrt(0.5) / math.sqrt(2))
    assert r["t_stat"] == pytest.approx(t) and r["t_p"] == pytest.approx(_t_p_df1(t), rel=1e-8)


def test_paired_test_five_seeds_significant():
    a = [11.0, 12.5, 10.0, 13.0, 12.0]
    b = [9.5, 10.0, 9.5, 9.0, 8.0]
    d = [x - y for x, y in zip(a, b, strict=True)]  # [1.5, 2.5, 0.5, 4, 4]
    r = paired_test(a, b)
    mean = sum(d) / 5
    sem = math.sqrt(sum((x - mean) ** 2 for x in d) / 4) / math.sqrt(5)
    assert r["mean_diff"] == pytest.approx(2.5)
    assert r["ci_low"] == pytest.approx(mean - T_975_DF4 * sem, rel=1e-8)
    assert r["t_stat"] == pytest.approx(mean / sem)
    assert 0.01 < r["t_p"] < 0.05  # t = 3.63 lies between t(0.99,4)=3.747 and t(0.975,4)=2.776
    assert r["significant"] and is_significant(r, 0.05) and not is_significant(r, 0.01)
    assert r["wilcoxon_p"] == pytest.approx(0.0625)  # all positive: the exact minimum for n=5


def test_wilcoxon_exact_with_mixed_signs():
    d = [1.5, -0.5, 2.0, 3.0, -4.0]
    r = paired_test(d, [0.0] * 5)
    assert r["wilcoxon_stat"] == 6.0  # R+ = 2+3+4 = 9, R- = 1+5 = 6
    assert r["wilcoxon_p"] == pytest.approx(_wilcoxon_exact_p(d))


@pytest.mark.parametrize(
    "a, b, reason",
    [
        ([], [], "n=0"),
        ([1.0], [2.0], "n=1"),
        ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], "zero"),
    ],
)
def test_paired_test_degenerate_never_crashes(a, b, reason):
    r = paired_test(a, b)
    assert r["t_p"] is None and r["wilcoxon_p"] is None
    assert reason in r["t_reason"] and r["significant"] is False


def test_paired_test_constant_difference():
    r = paired_test([2.0, 3.0, 4.0, 5.0, 6.0], [1.0, 2.0, 3.0, 4.0, 5.0])
    assert r["mean_diff"] == 1.0 and r["t_p"] is None and "zero variance" in r["t_reason"]
    assert r["wilcoxon_p"] == pytest.approx(2 / 32)  # all five ranks positive: the exact minimum
    assert r["significant"] is False


def test_paired_test_rejects_unequal_lengths():
    with pytest.raises(ValueError, match="equally many"):
        paired_test([1.0, 2.0], [1.0])


# --------------------------------------------------------------------------- sentences
def test_describe_significant():
    r = paired_test([11.0, 12.5, 10.0, 13.0, 12.0], [9.5, 10.0, 9.5, 9.0, 8.0])
    s = describe_difference("monotonic", "baseline", "perplexity", r, 0.05)
    assert s.startswith("monotonic − baseline perplexity: +2.5 (95% CI [")
    assert f"paired t-test p={r['t_p']:.3g}" in s
    assert "Wilcoxon signed-rank test p=" in s
    assert s.endswith("n=5 seeds: significant at α=0.05")
    strict = describe_difference("monotonic", "baseline", "perplexity", r, 0.01)
    assert "not significant at α=0.01; the smallest difference this test detects with 80% power is ±" in strict


def test_describe_not_significant_and_degenerate():
    r = paired_test([5.0, 7.0, 9.5], [4.0, 5.0, 6.0])
    s = describe_difference("monotonic", "baseline", "loss", r, 0.05, unit="examples")
    assert "paired t-test p=0.0964" in s and "n=3 examples: not significant at α=0.05; the smallest difference" in s
    one = describe_difference("monotonic", "baseline", "loss", paired_test([1.0], [2.0]), 0.05)
    assert "-1" in one and "not computed (n=1" in one and "n=1 seed:" in one and "not significant" in one
    assert "no data" in describe_difference("a", "b", "loss", paired_test([], []), 0.05)
