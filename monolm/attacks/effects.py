"""How an attack's effect is summarised: absolute increase first, relative second, with CIs.

Why absolute first: a relative increase divides by the clean loss and so flatters the weaker
model (in the original study the constrained model's UAT damage was larger in nats but smaller in
percent). The unit is the attacked text: means get a bootstrap CI over texts
(`monolm.stats.bootstrap_ci`, BCa) and the success rate (a text whose relative increase exceeds the
threshold) a Wilson score interval (`scipy.stats.binomtest`).

One number, one interval: the bootstrap is seeded by the run's seed and the values themselves
(`mean_ci`), not by where it is computed, so the same per-text numbers get the same interval in
`uat_results.json`, the diagonal of `transfer.json`, the stage manifest, `results.json` and the
report (stage 7 calls the same function).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats as sps

from monolm import stats
from monolm.core.runtime import derive_seed

CONFIDENCE = 0.95


def values_digest(values: Sequence[float]) -> str:
    """sha256 of the values as float64: equal numbers, equal digest, wherever they come from."""
    return hashlib.sha256(np.asarray(values, dtype=np.float64).tobytes()).hexdigest()


def mean_ci(values: Sequence[float], *, seed: int) -> tuple[float, float] | None:
    """The 95% bootstrap (BCa) CI of the mean of `values`, its resampling seeded by `seed` and the
    values: computing it again, in any file, gives the same interval. None for n < 2."""
    return stats.bootstrap_ci(values, seed=derive_seed(seed, "ci", values_digest(values)), confidence=CONFIDENCE)


def mean_with_ci(values: Sequence[float], *, seed: int) -> dict[str, Any]:
    """n, mean, std and a 95% bootstrap CI of the mean (None for n < 2)."""
    summary = stats.summarize(values, confidence=CONFIDENCE)
    ci = mean_ci(values, seed=seed)
    return {
        "n": summary["n"],
        "mean": summary["mean"],
        "std": summary["std"],
        "ci_low": None if ci is None else ci[0],
        "ci_high": None if ci is None else ci[1],
        "ci_method": f"bootstrap BCa {round(CONFIDENCE * 100)}% over texts",
    }


def rate_with_ci(successes: int, n: int) -> dict[str, Any]:
    if n == 0:
        return {"k": 0, "n": 0, "rate": None, "ci_low": None, "ci_high": None, "ci_method": "Wilson"}
    ci = sps.binomtest(successes, n).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return {
        "k": successes,
        "n": n,
        "rate": successes / n,
        "ci_low": float(ci.low),
        "ci_high": float(ci.high),
        "ci_method": f"Wilson {round(CONFIDENCE * 100)}%",
    }


def per_text_effects(clean: Sequence[float], attacked: Sequence[float], threshold: float) -> dict[str, list]:
    c = np.asarray(clean, dtype=float)
    a = np.asarray(attacked, dtype=float)
    abs_inc = a - c
    rel_inc = abs_inc / c
    return {
        "abs_increase": abs_inc.tolist(),
        "rel_increase": rel_inc.tolist(),
        "success": (rel_inc > threshold).tolist(),
    }


def effect_summary(clean: Sequence[float], attacked: Sequence[float], *, threshold: float, seed: int) -> dict[str, Any]:
    """The reported effect of an attack on a set of texts (keys in reading order: absolute
    increase first); its intervals depend only on `seed` and the losses (`mean_ci`)."""
    if len(clean) != len(attacked):
        raise ValueError("clean and attacked losses must be paired per text")
    eff = per_text_effects(clean, attacked, threshold)
    mean_clean = float(np.mean(clean)) if len(clean) else None
    mean_att = float(np.mean(attacked)) if len(attacked) else None
    return {
        "n_texts": len(clean),
        "abs_increase": mean_with_ci(eff["abs_increase"], seed=seed),
        "rel_increase": mean_with_ci(eff["rel_increase"], seed=seed),
        "rel_increase_of_means": None if not mean_clean else (mean_att - mean_clean) / mean_clean,
        "success_threshold": threshold,
        "success_rate": rate_with_ci(int(sum(eff["success"])), len(clean)),
        "clean_loss": mean_with_ci(clean, seed=seed),
        "attacked_loss": mean_with_ci(attacked, seed=seed),
    }
