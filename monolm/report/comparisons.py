"""Paired tests monotonic − baseline: across seeds where at least two seeds have both values, and
within every seed over its examples (the same attacked texts or evaluation documents, in the same
order, for both arms). Each result keeps the sentence `monolm.stats.describe_difference` makes of
it, which names the test and n and says "not significant" when the test says so."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from monolm import stats
from monolm.report.labels import ARMS, ATTACK_METRICS, ATTACKS, metric_label
from monolm.report.summaries import ALPHA, CONFIDENCE, clip_ci, is_rate
from monolm.report.values import doc_losses, example_effects
from monolm.report.verdicts import MIN_SEEDS


@dataclass
class Comparison:
    """One paired test of `a` against `b` (a − b) on one metric; `result` is `stats.paired_test`'s."""

    stage: str
    metric: str
    a: str
    b: str
    scope: str  # "seeds", "texts" or "documents"
    seed: int | None  # None across seeds; the seed for a within-seed test
    result: dict[str, Any]
    label: str = ""
    means: tuple[float, float] | None = None  # mean of a's and of b's values (what the difference is of)

    def to_json(self) -> dict[str, Any]:
        sentence = stats.describe_difference(
            self.a, self.b, self.label or self.metric, self.result, ALPHA, unit=self.scope
        )
        return {
            "stage": self.stage,
            "metric": self.metric,
            "a": self.a,
            "b": self.b,
            "scope": self.scope,
            "seed": self.seed,
            **{k: v for k, v in self.result.items() if k != "test_names"},
            "mean_a": self.means[0] if self.means else None,
            "mean_b": self.means[1] if self.means else None,
            "test": stats.TEST_NAMES["t"],
            "secondary_test": stats.TEST_NAMES["wilcoxon"],
            "sentence": sentence,
        }


ARM_PAIR = ("monotonic", "baseline")  # every arm difference is monotonic − baseline


def control_pair(stage: str) -> tuple[str, str]:
    """The two sides of a gradient-vs-control test ("gradient HotFlip", "random control")."""
    return (f"gradient {ATTACKS.get(stage, stage)}", "random control")


def across_seeds() -> tuple[tuple[str, str], ...]:
    """The (stage, metric) pairs compared across seeds, for every attack the registry has."""
    return (
        *(("evaluate", metric) for metric in ("token_perplexity", "loss", "bits_per_byte")),
        *((attack, metric) for attack in ATTACKS for metric in ATTACK_METRICS),
        ("hotflip", "control_abs_increase"),
        ("gcg", "control_abs_increase"),
        ("uat", "restart_mean_abs_increase"),
        ("gcg", "restart_mean_abs_increase"),
    )


Lookup = dict[tuple[int, str, str | None, str], float]  # (seed, stage, model, metric) -> value


def _compare(
    stage: str,
    metric: str,
    pair: tuple[str, str],
    scope: str,
    seed: int | None,
    a_values: Sequence[float],
    b_values: Sequence[float],
    label: str,
) -> Comparison:
    """The paired test of `a_values` against `b_values` (a − b), with both means kept for reports."""
    result = stats.paired_test(a_values, b_values, alpha=ALPHA, confidence=CONFIDENCE)
    if is_rate(metric) and result.get("ci_low") is not None and clip_ci(result, -1.0, 1.0):
        result["ci_clipped"] = "to [-1, 1], the range of a difference of two rates"
    means = (float(np.mean(a_values)), float(np.mean(b_values))) if len(a_values) else None
    return Comparison(stage, metric, pair[0], pair[1], scope, seed, result, label, means)


def _paired_over_seeds(
    lookup: Lookup, seed_ids: Sequence[int], stage: str, a: tuple[str, str], b: tuple[str, str]
) -> list[tuple[float, float]]:
    """(a, b) value pairs, a and b given as (model, metric), of every seed that has both."""
    return [
        (lookup[(s, stage, *a)], lookup[(s, stage, *b)])
        for s in seed_ids
        if (s, stage, *a) in lookup and (s, stage, *b) in lookup
    ]


def _across_seeds(lookup: Lookup, seed_ids: Sequence[int]) -> list[Comparison]:
    """Monotonic vs baseline over seeds, where at least `MIN_SEEDS` (3) seeds have both values (a
    stage may be missing in some seeds): with 2 seeds a t-test has one degree of freedom."""
    out = []
    for stage, metric in across_seeds():
        pairs = _paired_over_seeds(lookup, seed_ids, stage, ("monotonic", metric), ("baseline", metric))
        if len(pairs) >= MIN_SEEDS:
            mono, base = zip(*pairs, strict=True)
            out.append(_compare(stage, metric, ARM_PAIR, "seeds", None, mono, base, metric_label(stage, metric)))
    return out


def _gradient_vs_control(lookup: Lookup, seed_ids: Sequence[int], stage: str) -> list[Comparison]:
    """Does a gradient-guided attack (HotFlip, GCG) beat its query-only random control on each
    arm? (a check for gradient masking)"""
    out = []
    for arm in ARMS:
        pairs = _paired_over_seeds(lookup, seed_ids, stage, (arm, "abs_increase"), (arm, "control_abs_increase"))
        if len(pairs) >= MIN_SEEDS:
            grad, ctrl = zip(*pairs, strict=True)
            label = f"{arm} arm absolute loss increase (nats/token)"
            out.append(
                _compare(stage, f"gradient_vs_control_{arm}", control_pair(stage), "seeds", None, grad, ctrl, label)
            )
    return out


def _control_within_seed(data: dict[str, Any], stage: str) -> list[Comparison]:
    """A gradient-guided attack against its random control on each arm, over the same texts of
    one seed: does the gradient search beat chance? (a check for gradient masking)"""
    seed = int(data["seed"])
    per_example = (data.get("per_example") or {}).get(stage) or {}
    out = []
    for arm in ARMS:
        rec = per_example.get(arm) or {}
        if "control" not in rec:
            continue
        grad, ctrl = example_effects(per_example, arm), example_effects(rec, "control")
        label = f"{arm} arm absolute loss increase (nats/token, seed {seed})"
        metric = f"gradient_vs_control_{arm}"
        out.append(
            _compare(
                stage, metric, control_pair(stage), "texts", seed, grad["abs_increase"], ctrl["abs_increase"], label
            )
        )
    return out


def _within_seed(data: dict[str, Any]) -> list[Comparison]:
    """Monotonic vs baseline within one seed: over the attacked texts of each attack, and over
    the evaluation documents when stage 4 stored per-document losses."""
    seed = int(data["seed"])
    out = []
    for stage in ATTACKS:
        per_example = (data.get("per_example") or {}).get(stage)
        if not per_example or not all(arm in per_example for arm in ARMS):
            continue
        mono, base = example_effects(per_example, "monotonic"), example_effects(per_example, "baseline")
        for metric in ("abs_increase", "rel_increase"):
            label = f"{metric_label(stage, metric)} (seed {seed})"
            out.append(_compare(stage, metric, ARM_PAIR, "texts", seed, mono[metric], base[metric], label))
        if all("restart_mean" in per_example[arm] for arm in ARMS):  # universal triggers: per-text restart means
            mono_r, base_r = (example_effects(per_example[arm], "restart_mean")["abs_increase"] for arm in ARMS[::-1])
            label = f"{metric_label(stage, 'restart_mean_abs_increase')} (seed {seed})"
            out.append(_compare(stage, "restart_mean_abs_increase", ARM_PAIR, "texts", seed, mono_r, base_r, label))
    ev = data.get("evaluation")
    if ev:
        mono_docs, base_docs = doc_losses(ev, "monotonic"), doc_losses(ev, "baseline")
        if mono_docs is not None and base_docs is not None:
            mono_loss, base_loss = mono_docs[0] / mono_docs[1], base_docs[0] / base_docs[1]
            label = f"per-document loss (nats/token, seed {seed})"
            out.append(_compare("evaluate", "doc_loss", ARM_PAIR, "documents", seed, mono_loss, base_loss, label))
    return out


def compare_arms(values: Sequence[dict[str, Any]], seeds: Sequence[dict[str, Any]]) -> list[Comparison]:
    """Paired tests monotonic vs baseline: across seeds (n >= 2 seeds), and within every seed
    across its examples (the same texts/documents in the same order for both arms)."""
    lookup: Lookup = {(r["seed"], r["stage"], r["model"], r["metric"]): r["value"] for r in values}
    seed_ids = [int(d["seed"]) for d in seeds]
    across_control = {stage: _gradient_vs_control(lookup, seed_ids, stage) for stage in ATTACKS}
    out = _across_seeds(lookup, seed_ids) + [c for comps in across_control.values() for c in comps]
    for data in seeds:
        out += _within_seed(data)
    for stage, comps in across_control.items():
        if not comps:  # fewer than MIN_SEEDS seeds with the attack: test its control within each seed
            for data in seeds:
                out += _control_within_seed(data, stage)
    return out
