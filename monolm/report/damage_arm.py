"""The damage-matched arm in stage 7 (issue 23 item 2): its numbers, its paired tests against the
constrained arm, and its place in the headline table.

The damage-matched arm is the baseline with the variant's FFN matrices perturbed by noise until
its validation loss equals the constrained arm's (`monolm.controls`). At equal clean quality, a
constrained arm that the attacks hurt less than the damage-matched arm is more robust than its
damage explains; one that they hurt as much is only as robust as an equally damaged model.
Differences are constrained − damage-matched, over the same test documents and attacked texts.
The tests of the attacks' absolute increase form their own Holm family (role "damage").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from monolm import stats
from monolm.report.comparisons import Comparison, _compare, _paired_over_seeds
from monolm.report.formatting import fmt_num, fmt_p
from monolm.report.labels import ATTACKS, METRIC_LABEL
from monolm.report.summaries import summary
from monolm.report.values import _attack_effects, doc_losses, example_effects
from monolm.report.verdicts import MIN_SEEDS, mde_clause

DAMAGE = "damage"  # the arm's model name in results.json's values and summaries
PAIR = ("monotonic", "damage-matched")
PREFIX = "vs_damage_"  # comparison metrics: vs_damage_loss, vs_damage_doc_loss, vs_damage_abs_increase
LABEL = "damage-matched arm (baseline + noise on the same matrices, equal validation loss)"


def damage_values(damage: dict[str, Any], add) -> None:
    """The damage stage's numbers as per-seed values: test quality, the bisection, each attack."""
    test = damage.get("test") or {}
    for key in ("loss", "token_perplexity", "tokens", "docs"):
        add("evaluate", DAMAGE, key, test.get(key))
    search = damage.get("bisection") or {}
    for key, metric in (("scale", "noise_scale"), ("loss", "val_loss"), ("target", "target_val_loss")):
        add("damage", DAMAGE, metric, search.get(key))
    add("damage", DAMAGE, "within_tolerance", float(bool(search.get("within_tolerance"))))
    for attack, rec in (damage.get("attacks") or {}).items():
        _attack_effects(attack, DAMAGE, "", rec.get("summary") or {}, add)


def _within(data: dict[str, Any]) -> list[Comparison]:
    """Constrained vs damage-matched within one seed: per attacked text and per test document."""
    damage, seed, out = data.get("damage"), int(data["seed"]), []
    if not damage:
        return out
    for attack, rec in (damage.get("attacks") or {}).items():
        per_example = (data.get("per_example") or {}).get(attack) or {}
        if "monotonic" not in per_example:
            continue
        mono, dmg = example_effects(per_example, "monotonic"), example_effects({DAMAGE: rec}, DAMAGE)
        if mono["abs_increase"].size == dmg["abs_increase"].size:  # the same texts, in order
            label = f"{ATTACKS.get(attack, attack)} absolute loss increase vs damage-matched (seed {seed})"
            out.append(
                _compare(
                    attack,
                    f"{PREFIX}abs_increase",
                    PAIR,
                    "texts",
                    seed,
                    mono["abs_increase"],
                    dmg["abs_increase"],
                    label,
                )
            )
    mono_docs = doc_losses(data.get("evaluation") or {}, "monotonic")
    per_doc = (damage.get("test") or {}).get("per_doc")
    if mono_docs is not None and per_doc and len(per_doc) == mono_docs[0].size:
        dmg = np.asarray([d["nll"] / d["tokens"] for d in per_doc], dtype=float)
        label = f"per-document test loss vs damage-matched (nats/token, seed {seed})"
        out.append(_compare("evaluate", f"{PREFIX}doc_loss", PAIR, "documents", seed, mono_docs[0] / mono_docs[1],
                            dmg, label))  # fmt: skip
    return out


def damage_comparisons(values: Sequence[dict[str, Any]], seeds: Sequence[dict[str, Any]]) -> list[Comparison]:
    """Constrained vs damage-matched: across seeds (at least `MIN_SEEDS`) on the test loss and each
    attack's absolute increase, and within every seed over its documents and texts."""
    lookup = {(r["seed"], r["stage"], r["model"], r["metric"]): r["value"] for r in values}
    seed_ids = [int(d["seed"]) for d in seeds]
    out = []
    for stage, metric in (("evaluate", "loss"), *((a, "abs_increase") for a in ATTACKS)):
        pairs = _paired_over_seeds(lookup, seed_ids, stage, ("monotonic", metric), (DAMAGE, metric))
        if len(pairs) >= MIN_SEEDS:
            mono, dmg = zip(*pairs, strict=True)
            label = f"{ATTACKS.get(stage, 'test')} {METRIC_LABEL[metric]} vs damage-matched"
            out.append(_compare(stage, PREFIX + metric, PAIR, "seeds", None, mono, dmg, label))
    for data in seeds:
        out += _within(data)
    return out


def apply_damage_holm(comparisons: Sequence[dict[str, Any]], alpha: float) -> None:
    """Role "damage" for every constrained vs damage-matched test; Holm over the attacks' absolute
    increase tests (across seeds when there are any, else within every seed)."""
    mine = [c for c in comparisons if c["b"] == PAIR[1]]
    attacks = [c for c in mine if c["metric"] == f"{PREFIX}abs_increase"]
    family = [c for c in attacks if c["scope"] == "seeds"] or attacks
    adjusted = stats.holm([c.get("t_p") for c in family])
    m = sum(p is not None for p in adjusted)
    for comp in mine:
        comp.update(role=DAMAGE, p_holm=None, significant_holm=False, holm_m=None)
    for comp, p in zip(family, adjusted, strict=True):
        comp.update(p_holm=p, significant_holm=p is not None and p < alpha, holm_m=m)


def _damage_test(results: dict[str, Any], stage: str, metric: str) -> dict[str, Any] | None:
    comps = [c for c in results["comparisons"] if c["b"] == PAIR[1] and c["stage"] == stage]
    across = [c for c in comps if c["metric"] == PREFIX + metric and c["scope"] == "seeds"]
    within = [c for c in comps if c["metric"] == PREFIX + ("doc_loss" if stage == "evaluate" else metric)]
    return across[0] if across else (within[0] if len(within) == 1 else None)


def _verdict(stage: str, comp: dict[str, Any] | None) -> str:
    if comp is None or comp.get("mean_diff") is None:
        return "no test"
    if stage == "evaluate":  # matched on validation: the test part shows whether the match holds
        if comp.get("significant"):
            return "test loss differs"
        return f"matched (no significant difference{mde_clause(comp)})"
    if not comp.get("significant_holm"):
        return "no significant difference from an equally damaged model" + mde_clause(comp)
    return "less robust than equal damage" if comp["mean_diff"] > 0 else "more robust than its damage explains"


def damage_mean(results: dict[str, Any], stage: str, metric: str) -> float | None:
    """The damage-matched arm's value of a headline measure: the mean its paired test is of where
    there is one (so a row's numbers and its difference agree), else its summary's mean."""
    comp = _damage_test(results, stage, metric)
    if comp is not None and comp.get("mean_b") is not None:
        return comp["mean_b"]
    rec = summary(results, stage, DAMAGE, metric)
    return rec["mean"] if rec else None


def has_damage(results: dict[str, Any]) -> bool:
    return any(r["model"] == DAMAGE for r in results["summaries"])


def damage_rows(results: dict[str, Any], measures: Sequence[tuple[str, str]]) -> list[list[str]]:
    """Headline rows constrained vs damage-matched (Baseline column empty), in the headline's columns
    with the Damage-matched column after Constrained."""
    rows = []
    for stage, metric in measures:
        dmg = summary(results, stage, DAMAGE, metric)
        if dmg is None or metric not in ("loss", "abs_increase"):
            continue
        comp = _damage_test(results, stage, metric)
        mono = (summary(results, stage, "monotonic", metric) or {}).get("mean")
        if comp is not None and comp.get("mean_a") is not None:
            mono = comp["mean_a"]
        diff = ci = p = "—"
        if comp is not None and comp.get("mean_diff") is not None:
            diff = fmt_num(comp["mean_diff"], sign=True)
            ci = f"[{fmt_num(comp['ci_low'])}, {fmt_num(comp['ci_high'])}]" if comp.get("ci_low") is not None else "—"
            p = fmt_p(comp.get("t_p"))
            if comp.get("p_holm") is not None:
                p = f"{fmt_p(comp['p_holm'])} (uncorrected {p})"
        name = "Test loss (nats/token)" if stage == "evaluate" else f"{ATTACKS[stage]} {METRIC_LABEL[metric]}"
        n = (
            "—"
            if comp is None
            else f"{comp['n']} {comp['scope']}" + ("" if comp["scope"] == "seeds" else f" (seed {comp['seed']})")
        )
        rows.append(
            [f"{name}: constrained vs damage-matched", "—", fmt_num(mono), fmt_num(damage_mean(results, stage, metric)),
             diff, ci, p, _verdict(stage, comp), n]
        )  # fmt: skip
    return rows


def damage_note(results: dict[str, Any]) -> str:
    """What the damage-matched arm is, and whether its bisection reached the target."""
    scale = summary(results, "damage", DAMAGE, "noise_scale")
    ok = summary(results, "damage", DAMAGE, "within_tolerance")
    text = (
        f"Damage-matched: the {LABEL}; rows 'constrained vs damage-matched' give constrained − damage-matched, "
        "its attack tests Holm-corrected among themselves."
    )
    if scale:
        text += f" Noise scale {fmt_num(scale['mean'])} × each matrix's RMS"
        text += "." if not ok or ok["mean"] == 1 else " (the bisection did not reach the tolerance in every seed)."
    return text


def damage_seed_values(data: dict[str, Any]) -> list[dict[str, Any]]:
    """`damage_values` of one seed as flat records (like `monolm.report.values.seed_values`)."""
    seed, out = int(data["seed"]), []

    def add(stage: str, model: str | None, metric: str, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append({"seed": seed, "stage": stage, "model": model, "metric": metric, "value": float(value)})

    if data.get("damage"):
        damage_values(data["damage"], add)
    return out


def damage_findings(results: dict[str, Any]) -> list[str]:
    """One sentence per constrained vs damage-matched test of the primary measures."""
    out = []
    for comp in results["comparisons"]:
        if comp["b"] != PAIR[1] or comp.get("mean_diff") is None:
            continue
        stage = comp["stage"]
        words = _verdict(stage, comp)
        if comp.get("p_holm") is not None:
            words += f" (Holm-adjusted p={fmt_p(comp['p_holm'])} over {comp['holm_m']} tests)"
        what = ATTACKS.get(stage, "test loss") + ("" if comp["scope"] == "seeds" else f", seed {comp['seed']}")
        out.append(f"Constrained vs damage-matched arm ({what}): {words}. {comp['sentence']}.")
    return out
