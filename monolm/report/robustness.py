"""Effective robustness: is the constrained arm more robust, or only more damaged?

A model that is worse at its job is often less sensitive to an attack simply because it models
text less sharply. Following the effective-robustness literature (Taori et al. 2020; Miller et
al. 2021; Andreassen et al. 2022), each attack's loss increase is compared with a reference trend:
the increase that reference models *of the same clean quality* show. The references are the
quality ladder (`monolm.controls.ladder`: the same architecture and tokenizer at several stages of
pre-training), the base model and the baseline. Per attack:

* a straight line, loss increase against clean test loss, is fitted through the references;
* an arm's *effective robustness* is its measured increase minus the line's prediction at the
  arm's clean loss (nats/token; negative: the loss rose less than quality predicts);
* the 95% interval is a percentile bootstrap that redraws the test documents (clean loss) and the
  attacked texts (increase), the same draw for every model (they share documents and texts), and
  the seeds when there are several; the line is refitted in every draw, so the interval carries
  the trend's uncertainty as well as the arm's.

An arm whose clean loss lies outside the references' range gets no verdict: the line would be
extrapolated. Pure functions on arrays, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

N_BOOT = 2000
CONFIDENCE = 0.95
MORE = "more robust than its quality predicts"
EQUAL = "as robust as a model of equal quality"
LESS = "less robust than its quality predicts"
OUTSIDE = "outside the ladder's range of clean loss: no verdict"


@dataclass(frozen=True)
class SeedPoint:
    """One model in one seed: per test document its summed NLL and token count, and per attacked
    text its loss increase (attacked − clean, nats/token) under one attack."""

    doc_nll: np.ndarray
    doc_tokens: np.ndarray
    increase: np.ndarray

    @classmethod
    def of(cls, doc_nll: Sequence[float], doc_tokens: Sequence[float], increase: Sequence[float]) -> SeedPoint:
        return cls(np.asarray(doc_nll, float), np.asarray(doc_tokens, float), np.asarray(increase, float))


Model = Mapping[int, SeedPoint]  # seed -> the model's point in that seed


@dataclass(frozen=True)
class Effective:
    """One arm's effective robustness under one attack, and the verdict computed from it."""

    arm: str
    clean_loss: float
    increase: float
    predicted: float
    effective: float
    ci_low: float
    ci_high: float
    p_value: float  # two-sided bootstrap p for effective robustness = 0
    in_range: bool
    verdict: str

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def _draws(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap index draws [n_boot, n]; row 0 is the data itself (the point estimate)."""
    idx = rng.integers(0, n, size=(n_boot + 1, n))
    idx[0] = np.arange(n)
    return idx


def _replicates(models: Mapping[str, Model], n_boot: int, seed: int) -> tuple[dict[str, np.ndarray], ...]:
    """Per model: clean loss and mean increase in each bootstrap draw (draw 0: the data), averaged
    over the seeds of the draw. Every model is resampled with the same indices."""
    rng = np.random.default_rng(seed)
    seeds = sorted(next(iter(models.values())))
    for name, model in models.items():
        if sorted(model) != seeds:
            raise ValueError(f"model {name!r} has seeds {sorted(model)}, the others {seeds}")
    seed_draw = _draws(len(seeds), n_boot, rng) if len(seeds) > 1 else np.zeros((n_boot + 1, 1), int)
    x = {name: np.zeros(n_boot + 1) for name in models}
    y = {name: np.zeros(n_boot + 1) for name in models}
    for k, s in enumerate(seeds):
        first = models[next(iter(models))][s]
        docs = _draws(first.doc_nll.size, n_boot, rng)
        texts = _draws(first.increase.size, n_boot, rng)
        weight = (seed_draw == k).sum(axis=1) / seed_draw.shape[1]  # how often seed k is in each draw
        for name, model in models.items():
            p = model[s]
            if p.doc_nll.size != first.doc_nll.size or p.increase.size != first.increase.size:
                raise ValueError(f"model {name!r} in seed {s}: not the same documents and texts as the others")
            x[name] += weight * p.doc_nll[docs].sum(axis=1) / p.doc_tokens[docs].sum(axis=1)
            y[name] += weight * p.increase[texts].mean(axis=1)
    return x, y


def _fit(xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares line per draw: xs, ys [n_draws, n_points] -> (intercept, slope) [n_draws]."""
    xm, ym = xs.mean(axis=1, keepdims=True), ys.mean(axis=1, keepdims=True)
    var = ((xs - xm) ** 2).sum(axis=1)
    slope = np.where(var > 0, ((xs - xm) * (ys - ym)).sum(axis=1) / np.where(var > 0, var, 1), 0.0)
    return ym[:, 0] - slope * xm[:, 0], slope


def verdict(effective: float, ci_low: float, ci_high: float, in_range: bool) -> str:
    """The sentence the numbers support: an interval below 0 means the loss rose less than a model
    of equal quality would (more robust), above 0 more (less robust), containing 0 neither."""
    if not in_range:
        return OUTSIDE
    if ci_high < 0:
        return MORE
    if ci_low > 0:
        return LESS
    return EQUAL


def effective_robustness(
    references: Mapping[str, Model], arms: Mapping[str, Model], *, n_boot: int = N_BOOT, seed: int = 0
) -> tuple[dict[str, Effective], dict[str, object]]:
    """Every arm's effective robustness against the references' trend, and the trend itself
    (the references' points, the line and its 95% band on a grid of clean losses, for the figure)."""
    if len(references) < 2:
        raise ValueError("effective robustness needs at least two reference models")
    models = {**references, **arms}
    x, y = _replicates(models, n_boot, seed)
    refs = list(references)
    xs, ys = np.stack([x[r] for r in refs], axis=1), np.stack([y[r] for r in refs], axis=1)
    intercept, slope = _fit(xs, ys)
    lo, hi = float(xs[0].min()), float(xs[0].max())
    tail = (1 - CONFIDENCE) / 2
    out: dict[str, Effective] = {}
    for arm in arms:
        er = y[arm] - (intercept + slope * x[arm])
        boot = er[1:]
        low, high = np.quantile(boot, [tail, 1 - tail])
        # Two-sided; never below 1/n_boot, the smallest p that many draws resolve (a bound, not 0).
        p = min(1.0, max(2 * min(float(np.mean(boot <= 0)), float(np.mean(boot >= 0))), 1 / n_boot))
        in_range = lo <= x[arm][0] <= hi
        out[arm] = Effective(
            arm=arm,
            clean_loss=float(x[arm][0]),
            increase=float(y[arm][0]),
            predicted=float(intercept[0] + slope[0] * x[arm][0]),
            effective=float(er[0]),
            ci_low=float(low),
            ci_high=float(high),
            p_value=p,
            in_range=bool(in_range),
            verdict=verdict(float(er[0]), float(low), float(high), bool(in_range)),
        )
    grid = np.linspace(lo, hi, 25)
    band = intercept[1:, None] + slope[1:, None] * grid[None, :]
    trend = {
        "points": {name: [float(x[name][0]), float(y[name][0])] for name in models},
        "references": refs,
        "intercept": float(intercept[0]),
        "slope": float(slope[0]),
        "range": [lo, hi],
        "grid": grid.tolist(),
        "fit": (intercept[0] + slope[0] * grid).tolist(),
        "band": [np.quantile(band, tail, axis=0).tolist(), np.quantile(band, 1 - tail, axis=0).tolist()],
        "x_ci": {name: np.quantile(x[name][1:], [tail, 1 - tail]).tolist() for name in models},
        "y_ci": {name: np.quantile(y[name][1:], [tail, 1 - tail]).tolist() for name in models},
    }
    return out, trend
