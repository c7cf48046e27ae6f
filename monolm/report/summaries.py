"""Across-seed summaries of the per-seed values: one record per (stage, model, metric) with n
seeds, mean ± std (ddof=1) and a Student-t 95% interval. With one seed the interval comes from
the examples instead (bootstrap over attacked texts or evaluation documents), and the record says
so: it describes one trained pair of models, not the variation between training seeds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats as sps

from monolm import stats
from monolm.attacks.effects import mean_ci
from monolm.core.runtime import derive_seed
from monolm.report.labels import ARMS, ATTACKS
from monolm.report.values import ATTACK_KEYS, EXAMPLE_METRICS, doc_losses, example_effects
from monolm.report.verdicts import MIN_SEEDS

ALPHA = 0.05  # significance level of every paired test
CONFIDENCE = 0.95  # level of every confidence interval


def _bootstrap_seed(seed: int, *tags: str) -> int:
    return derive_seed(seed, "aggregate", *tags)


def token_weighted_ci(
    nll: np.ndarray, tokens: np.ndarray, *, seed: int, perplexity: bool
) -> tuple[float, float] | None:
    """Bootstrap (BCa, resampling documents) CI of the token-weighted loss or perplexity."""
    if nll.size < 2:
        return None

    def statistic(n: np.ndarray, t: np.ndarray, axis: int = -1) -> np.ndarray:
        loss = n.sum(axis=axis) / t.sum(axis=axis)
        return np.exp(loss) if perplexity else loss

    res = sps.bootstrap(
        (nll, tokens),
        statistic,
        paired=True,
        vectorized=True,
        n_resamples=10000,
        confidence_level=CONFIDENCE,
        method="BCa",
        rng=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _single_seed_ci(
    data: dict[str, Any], stage: str, model: str | None, metric: str
) -> tuple[Any, str | None, int | None]:
    """The CI of a one-seed value from its examples: (ci or None, method, n examples)."""
    seed = int(data["seed"])
    if stage in ATTACKS and model in ARMS:
        per_example = (data.get("per_example") or {}).get(stage) or {}
        if metric in EXAMPLE_METRICS and model in per_example:
            values = example_effects(per_example, model)[metric]
            return mean_ci(values, seed=seed), "bootstrap BCa over texts", int(values.size)  # as the stage's
        block, key = ("control", metric[len("control_") :]) if metric.startswith("control_") else ("per_model", metric)
        rec = ((data["stages"][stage]["metrics"].get(block) or {}).get(model)) or {}
        ci = rec.get(f"{key}_ci")
        if key in ATTACK_KEYS and ci and None not in ci:
            method = "Wilson score interval over texts" if key == "success_rate" else "bootstrap BCa over texts"
            return (float(ci[0]), float(ci[1])), f"{method} (stage {stage})", rec.get("n")
    if stage == "evaluate" and metric in ("token_perplexity", "loss") and data.get("evaluation"):
        docs = doc_losses(data["evaluation"], model or "")
        if docs is not None:
            ci = token_weighted_ci(
                *docs, seed=_bootstrap_seed(seed, stage, model or "", metric), perplexity=metric == "token_perplexity"
            )
            return ci, "bootstrap BCa over documents", int(docs[0].size)
    return None, None, None


def is_rate(metric: str) -> bool:
    """Rates (success, violation) live in [0, 1]; their across-seed t-interval may not."""
    return metric.endswith("_rate")


def clip_ci(rec: dict[str, Any], low: float, high: float) -> bool:
    """Clip `rec`'s interval (`ci_low`, `ci_high`) to [low, high], the range its quantity can take:
    with 2-5 seeds a t-interval of a rate (or of a difference of rates) can reach outside it, which
    no reader should have to interpret. True when it was clipped, so the caller can say so."""
    clipped = max(low, rec["ci_low"]), min(high, rec["ci_high"])
    if clipped == (rec["ci_low"], rec["ci_high"]):
        return False
    rec.update(ci_low=clipped[0], ci_high=clipped[1])
    return True


def summarize_values(values: Sequence[dict[str, Any]], seeds: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (stage, model, metric): n seeds, mean, std, 95% CI and how it was obtained."""
    by_seed = {int(d["seed"]): d for d in seeds}
    groups: dict[tuple[str, str | None, str], list[dict[str, Any]]] = {}
    for rec in values:
        groups.setdefault((rec["stage"], rec["model"], rec["metric"]), []).append(rec)
    out = []
    for (stage, model, metric), items in groups.items():
        s = stats.summarize([r["value"] for r in items], confidence=CONFIDENCE)
        rec = {
            "stage": stage,
            "model": model,
            "metric": metric,
            "n": s["n"],
            "seeds": [r["seed"] for r in items],
            "values": [r["value"] for r in items],
            "mean": s["mean"],
            "std": s["std"],
            "sem": s["sem"],
            "ci_low": s["ci_low"],
            "ci_high": s["ci_high"],
            "ci_method": None,
            "n_examples": None,
            "reason": s["reason"],
        }
        if 1 < s["n"] < MIN_SEEDS:  # 2 seeds: a t-interval with 1 degree of freedom (zero width if equal)
            rec.update(ci_low=None, ci_high=None, reason=f"{s['n']} seeds: no interval (needs at least {MIN_SEEDS})")
        elif s["n"] >= MIN_SEEDS and s["ci_low"] is not None:
            rec["ci_method"] = f"t-interval over seeds (n={s['n']})"
            if is_rate(metric) and clip_ci(rec, 0.0, 1.0):
                rec["ci_method"] += ", clipped to [0, 1]"
        elif s["n"] == 1:
            ci, method, n_examples = _single_seed_ci(by_seed[items[0]["seed"]], stage, model, metric)
            if ci is not None:
                rec.update(
                    ci_low=ci[0],
                    ci_high=ci[1],
                    ci_method=f"{method} (one seed, n={n_examples})",
                    n_examples=n_examples,
                    reason="one seed: the interval is over examples, not seeds",
                )
        out.append(rec)
    return out


def summary_of(
    summaries: Sequence[dict[str, Any]], stage: str, model: str | None, metric: str
) -> dict[str, Any] | None:
    """The summary record of (stage, model, metric), None when there is none."""
    for rec in summaries:
        if rec["stage"] == stage and rec["model"] == model and rec["metric"] == metric:
            return rec
    return None


def summary(results: dict[str, Any], stage: str, model: str | None, metric: str) -> dict[str, Any] | None:
    """`summary_of` on results.json's `summaries`."""
    return summary_of(results["summaries"], stage, model, metric)
