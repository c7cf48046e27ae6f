"""`monolm plan`'s power section (issue 23 item 4): for a preset, the minimum detectable effect
(80% power, two-sided paired t-test) of each headline test, and with a target effect the number
of seeds, texts or documents that reaches it.

The standard deviation of the paired differences comes from the latest comparable run in the
results store (same preset, and the same variant when there is one): its comparison rows keep the
test's n and 95% t-interval, and sd = half-width · sqrt(n) / t_{0.975, n−1}. Without such a run the
stated defaults below are used, and the table says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scipy import stats

from monolm.config import ExperimentConfig
from monolm.stats_power import POWER, mde_paired, n_for_effect
from monolm.study.registry import ATTACKS

# sd of the paired differences when no comparable run exists (nats/token): across seeds, quality
# and attack effects vary little; per document and per text much more.
DEFAULT_SD = {("loss", "seeds"): 0.05, ("doc_loss", "documents"): 0.15, ("abs_increase", "seeds"): 0.05}
DEFAULT_TEXT_SD = 0.2  # an attack's per-text absolute increase


@dataclass
class PowerRow:
    """One headline test: what it compares, over which unit, its planned n, the sd used and the MDE."""

    label: str
    stage: str
    metric: str
    unit: str  # seeds, texts or documents
    n: int
    sd: float
    source: str
    mde: float | None
    n_for_target: int | None = None


def _attack_texts(cfg: ExperimentConfig, attack: str) -> int | None:
    settings = getattr(cfg.attacks, attack, None)
    for field in ("n_eval_texts", "n_texts"):
        if settings is not None and getattr(settings, field, None):
            return int(getattr(settings, field))
    return None


def headline_tests(cfg: ExperimentConfig) -> list[tuple[str, str, str, str, int]]:
    """(label, stage, metric as stored, unit, planned n) of every headline (primary) test."""
    seeds = len(cfg.seeds)
    docs = min(cfg.evaluation.max_docs, cfg.data.n_test_docs)
    tests = [
        ("quality: test loss (nats/token)", "evaluate", "loss", "seeds", seeds),
        ("quality: test loss per document, one seed", "evaluate", "doc_loss", "documents", docs),
    ]
    for attack, label in ATTACKS.items():
        tests.append((f"{label}: absolute loss increase", attack, "abs_increase", "seeds", seeds))
        texts = _attack_texts(cfg, attack)
        if texts:
            tests.append((f"{label}: absolute loss increase, one seed", attack, "abs_increase", "texts", texts))
    return tests


def sd_from_interval(low: float, high: float, n: int, confidence: float = 0.95) -> float | None:
    """The sd of the differences behind a Student-t interval of their mean over n pairs."""
    if n < 2 or low is None or high is None:
        return None
    return (high - low) / 2 * math.sqrt(n) / float(stats.t.ppf(0.5 + confidence / 2, n - 1))


def observed_sds(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], float]:
    """(stage, metric, unit) -> sd of the paired differences, from a run's stored comparison rows
    (`<metric>:diff` of monotonic-baseline; the mean over seeds for within-seed tests)."""
    found: dict[tuple[str, str, str], list[float]] = {}
    for row in rows:
        extra = row.get("extra") or {}
        if row.get("arm") != "monotonic-baseline" or not str(row.get("metric", "")).endswith(":diff"):
            continue
        ci, n = extra.get("ci") or [None, None], extra.get("n") or 0
        sd = sd_from_interval(ci[0], ci[1], int(n)) if None not in ci else None
        if sd is not None:
            key = (row["stage"], row["metric"].removesuffix(":diff"), extra.get("scope") or "seeds")
            found.setdefault(key, []).append(sd)
    return {k: sum(v) / len(v) for k, v in found.items()}


def latest_comparable(cfg: ExperimentConfig) -> tuple[str | None, list[dict[str, Any]]]:
    """(run name, its metric rows) of the newest completed run of the preset (same variant
    preferred) in the configured results store; (None, []) when the store has none or is absent."""
    from monolm.store import ResultsStore

    url = cfg.store_url
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return None, []
    with ResultsStore(url) as store:
        runs = store.runs(cfg.preset, status="completed")
        same = [r for r in runs if r.get("variant") == cfg.constraint.variant] or runs
        if not same:
            return None, []
        run = same[-1]
        return run["run_name"], store.query(run_id=run["run_id"])


def power_rows(
    cfg: ExperimentConfig, sds: dict[tuple[str, str, str], float], source: str, target: float | None = None
) -> list[PowerRow]:
    """One row per headline test: the MDE at the planned n and, with `target`, the n reaching it."""
    out = []
    for label, stage, metric, unit, n in headline_tests(cfg):
        sd = sds.get((stage, metric, unit))
        where = source
        if sd is None:
            sd = DEFAULT_TEXT_SD if unit == "texts" else DEFAULT_SD[(metric, unit)]
            where = "stated default"
        row = PowerRow(label, stage, metric, unit, n, sd, where, mde_paired(sd, n))
        if target is not None:
            row.n_for_target = n_for_effect(target, sd)
        out.append(row)
    return out


def format_power(rows: list[PowerRow], target: float | None) -> str:
    lines = [
        f"Minimum detectable effect (MDE) of each headline test at {POWER:.0%} power "
        "(two-sided paired t-test, α = 0.05; sd = standard deviation of the paired differences):",
        f"{'test':<52}{'unit':>10}{'n':>7}{'sd':>10}{'MDE':>10}"
        + (f"{'n for ' + format(target, 'g'):>14}" if target is not None else "")
        + "  sd from",
    ]
    for r in rows:
        mde = f"{r.mde:.3g}" if r.mde is not None else "—"
        line = f"{r.label:<52}{r.unit:>10}{r.n:>7}{r.sd:>10.3g}{mde:>10}"
        if target is not None:
            line += f"{r.n_for_target:>14}"
        lines.append(line + f"  {r.source}")
    return "\n".join(lines)
