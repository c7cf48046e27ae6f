"""The smallest effect a paired test could have seen (issue 23): power of the two-sided paired
t-test, its minimum detectable effect (MDE) at a given power, and the n that reaches a target.

Why: "no significant difference" is only informative together with what the test could have
detected. With 2 seeds a paired t-test has 1 degree of freedom and misses differences of several
standard deviations; the report states, next to every non-significant result, the difference the
test would have detected with 80% power given its observed standard deviation and n.

Exact, not the normal approximation: under a true mean difference delta the paired t statistic
follows a noncentral t with n − 1 degrees of freedom and noncentrality delta·sqrt(n)/sd, so

    power(delta) = P(T > t_{1−α/2}) + P(T < −t_{1−α/2}),  T ~ nct(n − 1, delta·sqrt(n)/sd)

(what statsmodels' TTestPower computes). The MDE solves power(delta) = target for delta > 0; the
n for a target effect is the smallest n >= 2 whose power reaches the target.
"""

from __future__ import annotations

import math

from scipy import optimize, stats

POWER = 0.8
ALPHA = 0.05
MAX_N = 1_000_000


def power_paired(effect: float, sd: float, n: int, *, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test at level `alpha` to detect a true mean difference
    `effect` when the differences have standard deviation `sd` and there are `n` pairs."""
    if n < 2:
        return float("nan")
    if sd <= 0:
        return 1.0 if effect != 0 else alpha
    df = n - 1
    crit = stats.t.ppf(1 - alpha / 2, df)
    nc = abs(effect) * math.sqrt(n) / sd
    upper, lower = float(stats.nct.sf(crit, df, nc)), float(stats.nct.cdf(-crit, df, nc))
    # scipy's nct can return NaN for a vanishing tail at large df: that tail is 0 there
    return (upper if math.isfinite(upper) else 1.0 if nc > crit else 0.0) + (lower if math.isfinite(lower) else 0.0)


def mde_paired(sd: float | None, n: int, *, alpha: float = ALPHA, power: float = POWER) -> float | None:
    """The smallest true mean difference (in the measure's units, > 0) that the two-sided paired
    t-test detects with probability `power`; None when it is undefined (n < 2, no sd)."""
    if sd is None or n < 2 or not math.isfinite(sd):
        return None
    if sd == 0:
        return 0.0
    # power(delta) rises from alpha (delta = 0) to 1; bracket the root in units of sd.
    hi = sd
    while power_paired(hi, sd, n, alpha=alpha) < power:
        hi *= 2
    return float(optimize.brentq(lambda d: power_paired(d, sd, n, alpha=alpha) - power, 0.0, hi, xtol=sd * 1e-10))


def n_for_effect(effect: float, sd: float, *, alpha: float = ALPHA, power: float = POWER) -> int:
    """The smallest number of pairs (>= 2) with which the paired t-test detects a true mean
    difference `effect` with probability `power`, given the differences' standard deviation `sd`."""
    if effect == 0:
        raise ValueError("target effect must be non-zero")
    if sd <= 0:
        return 2
    lo, hi = 2, 2
    while power_paired(effect, sd, hi, alpha=alpha) < power:
        lo, hi = hi, hi * 2
        if hi > MAX_N:
            raise ValueError(f"more than {MAX_N} pairs would be needed for an effect of {effect:g}")
    while lo < hi:  # power rises with n: the first n that reaches it
        mid = (lo + hi) // 2
        if power_paired(effect, sd, mid, alpha=alpha) >= power:
            hi = mid
        else:
            lo = mid + 1
    return lo


def mde_sentence(mde: float | None, power: float = POWER) -> str:
    """The clause reports add to a non-significant result."""
    if mde is None:
        return "no minimum detectable effect (fewer than 2 pairs)"
    return f"the smallest difference this test detects with {round(100 * power)}% power is ±{mde:.3g}"
