"""Statistics for the aggregate stage: summaries with CIs and paired tests between arms.

Why scipy and not hand-written formulas: the t quantiles, the exact Wilcoxon null distribution
and BCa bootstrap intervals are easy to get subtly wrong, and reviewers trust scipy.stats.

Every function degrades gracefully instead of raising on the small-sample cases that real runs
produce (one seed in the demo, identical values when a metric saturates): the affected numbers
are None and a `reason` says why, so a report can print "n=1: no CI" rather than crash at the
end of a multi-day run.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
from scipy import stats

from monolm.stats_power import mde_paired, mde_sentence

TEST_NAMES = {"t": "paired t-test", "wilcoxon": "Wilcoxon signed-rank test"}


def _as_array(values: Sequence[float], name: str = "values") -> np.ndarray:
    arr = np.asarray(list(values), dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a flat sequence of numbers")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values: {arr.tolist()}")
    return arr


def _f(x: Any) -> float | None:
    return None if x is None else float(x)


def summarize(values: Sequence[float], *, confidence: float = 0.95) -> dict[str, Any]:
    """n, mean, std (ddof=1), sem and a Student-t confidence interval for the mean.

    With seeds as the unit, n is small (5), so the t interval (not a normal one) is the honest
    choice. n < 2 gives None for everything but n and mean, with a `reason`.
    """
    arr = _as_array(values)
    n = int(arr.size)
    out: dict[str, Any] = {
        "n": n,
        "mean": _f(arr.mean()) if n else None,
        "std": None,
        "sem": None,
        "ci_low": None,
        "ci_high": None,
        "confidence": confidence,
        "reason": None,
    }
    if n < 2:
        out["reason"] = f"n={n}: a standard deviation and confidence interval need at least 2 values"
        return out
    std = float(arr.std(ddof=1))
    sem = float(stats.sem(arr))
    out.update(std=std, sem=sem)
    if sem == 0.0:  # identical values: the interval collapses to the point (scipy would give NaN)
        out.update(ci_low=out["mean"], ci_high=out["mean"], reason="all values identical")
    else:
        low, high = stats.t.interval(confidence, df=n - 1, loc=out["mean"], scale=sem)
        out.update(ci_low=float(low), ci_high=float(high))
    return out


def bootstrap_ci(
    values: Sequence[float],
    *,
    n_resamples: int = 10000,
    confidence: float = 0.95,
    seed: int,
    method: Literal["BCa", "percentile", "basic"] = "BCa",
    statistic: Callable[..., Any] = np.mean,
) -> tuple[float, float] | None:
    """Bootstrap CI of `statistic` (scipy.stats.bootstrap), reproducible through `seed`.

    Used across examples (hundreds of attacked texts), where the bootstrap is reliable; across
    five seeds prefer `summarize`'s t interval. Returns None for fewer than 2 values, and the
    point itself when all values are identical (BCa is undefined there).
    """
    arr = _as_array(values)
    if arr.size < 2:
        return None
    if np.all(arr == arr[0]):
        point = float(statistic(arr))
        return point, point
    res = stats.bootstrap(
        (arr,),
        statistic,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method=method,
        rng=np.random.default_rng(seed),
    )
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"bootstrap ({method}) gave a non-finite interval for {arr.tolist()}")
    return low, high


def paired_test(
    a: Sequence[float], b: Sequence[float], *, alpha: float = 0.05, confidence: float = 0.95
) -> dict[str, Any]:
    """Paired comparison of `a` against `b` (same seeds or same examples, in the same order).

    Reports the mean difference a - b with a t confidence interval, the paired t-test
    (scipy.stats.ttest_rel) and the Wilcoxon signed-rank test (scipy.stats.wilcoxon, exact for
    small n). `significant` uses the t-test at `alpha`. Degenerate inputs never raise: n < 2, all
    differences zero, or constant differences give p=None with a reason. Note that with n=5 the
    exact two-sided Wilcoxon p-value cannot go below 2/32 = 0.0625.
    """
    x, y = _as_array(a, "a"), _as_array(b, "b")
    if x.size != y.size:
        raise ValueError(f"paired_test needs equally many values, got {x.size} and {y.size}")
    d = x - y
    n = int(d.size)
    diff = summarize(d, confidence=confidence)
    out: dict[str, Any] = {
        "n": n,
        "mean_diff": diff["mean"],
        "ci_low": diff["ci_low"],
        "ci_high": diff["ci_high"],
        "confidence": confidence,
        "t_stat": None,
        "t_p": None,
        "t_reason": None,
        "wilcoxon_stat": None,
        "wilcoxon_p": None,
        "wilcoxon_reason": None,
        "test_names": dict(TEST_NAMES),
        "alpha": alpha,
        "significant": False,
    }
    if n < 2:
        out["t_reason"] = out["wilcoxon_reason"] = f"n={n}: a paired test needs at least 2 pairs"
        return out
    if np.all(d == 0):
        out["t_reason"] = out["wilcoxon_reason"] = "all differences are zero"
        return out
    if np.all(d == d[0]):
        out["t_reason"] = "the differences have zero variance, so t is undefined"
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            t = stats.ttest_rel(x, y)
        out["t_stat"], out["t_p"] = float(t.statistic), float(t.pvalue)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        w = stats.wilcoxon(x, y)
    if math.isfinite(float(w.pvalue)):
        out["wilcoxon_stat"], out["wilcoxon_p"] = float(w.statistic), float(w.pvalue)
    else:
        out["wilcoxon_reason"] = "the Wilcoxon test is undefined for these differences"
    out["significant"] = is_significant(out, alpha)
    out["sd_diff"] = diff["std"]
    out["mde"] = mde_paired(diff["std"], n, alpha=alpha)  # what "not significant" could have seen
    return out


def is_significant(result: dict[str, Any], alpha: float = 0.05) -> bool:
    """The primary (paired t) test's p-value is below `alpha`; False when it was not computable."""
    return result.get("t_p") is not None and result["t_p"] < alpha


def _num(x: float, sign: bool = False) -> str:
    return f"{x:+.4g}" if sign else f"{x:.4g}"


def _p(p: float) -> str:
    return f"{p:.3g}" if p >= 0.001 else f"{p:.1e}"


def describe_difference(
    name_a: str, name_b: str, metric: str, result: dict[str, Any], alpha: float = 0.05, *, unit: str = "seeds"
) -> str:
    """One sentence, computed from `paired_test(a, b)`'s numbers, for reports.

    e.g. "monotonic − baseline perplexity: +1.23 (95% CI [0.12, 2.34]), paired t-test p=0.041,
    Wilcoxon signed-rank test p=0.062, n=5 seeds: significant at α=0.05".
    """
    n = result["n"]
    mean = result.get("mean_diff")
    head = f"{name_a} − {name_b} {metric}: "
    if mean is None:
        return head + f"no data (n={n} {unit})"
    level = round(100 * result.get("confidence", 0.95))
    parts = [_num(mean, sign=True)]
    if result.get("ci_low") is not None:
        parts[0] += f" ({level}% CI [{_num(result['ci_low'])}, {_num(result['ci_high'])}])"
    names = result.get("test_names", TEST_NAMES)
    if result.get("t_p") is not None:
        parts.append(f"{names['t']} p={_p(result['t_p'])}")
    else:
        parts.append(f"{names['t']} not computed ({result.get('t_reason')})")
    if result.get("wilcoxon_p") is not None:
        parts.append(f"{names['wilcoxon']} p={_p(result['wilcoxon_p'])}")
    if is_significant(result, alpha):
        verdict = f"significant at α={alpha:g}"
    elif result.get("t_p") is None:
        verdict = f"not significant at α={alpha:g} (no t-test possible)"
    else:
        mde = mde_paired(result.get("sd_diff"), n, alpha=alpha) if "sd_diff" in result else result.get("mde")
        verdict = f"not significant at α={alpha:g}; {mde_sentence(mde)}"
    label = unit[:-1] if n == 1 and unit.endswith("s") else unit
    return head + ", ".join(parts) + f", n={n} {label}: {verdict}"


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values, in the order given (None stays None).

    With m computed p-values sorted ascending p(1) ≤ … ≤ p(m), the adjusted value of p(i) is
    max over j ≤ i of min(1, (m − j + 1)·p(j)): reject where it is below α and the family-wise error
    rate is at most α under any dependence between the tests (the variants of a grid share their
    baseline models, so their tests are not independent). A None (a test that could not be
    computed) is not a hypothesis: it does not count in m and stays None. Ties keep their order.
    """
    computed = [(i, float(p)) for i, p in enumerate(pvalues) if p is not None]
    for i, p in computed:
        if not (math.isfinite(p) and 0.0 <= p <= 1.0):
            raise ValueError(f"holm: p-value {pvalues[i]!r} at position {i} is not in [0, 1]")
    m = len(computed)
    adjusted: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (i, p) in enumerate(sorted(computed, key=lambda item: item[1])):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted
