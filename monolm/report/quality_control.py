"""Findings that say which robustness differences survive the quality control: per attack, the
raw comparison of the arms (the constrained arm's loss increase minus the baseline's, the primary
test) set beside the constrained arm's effective robustness (its increase minus what models of
its clean quality show, `monolm.report.robust_section`). A constrained model that is "harder to
attack" only because it is worse at its job has a raw gain that does not survive."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from monolm.report.damage_arm import PAIR
from monolm.report.labels import ATTACKS
from monolm.report.robustness import EQUAL, LESS, MORE, OUTSIDE
from monolm.report.verdicts import significant

CONSTRAINED, DAMAGE_MATCHED = PAIR  # the arms of the constrained vs damage-matched tests


def _raw_comparison(comps: Sequence[dict[str, Any]], attack: str) -> dict[str, Any] | None:
    """The arms' primary test of the absolute loss increase under `attack` (across seeds when
    there are enough, else within the seed), never the damage-matched pair's."""
    own = [
        c
        for c in comps
        if c["stage"] == attack and c["metric"] == "abs_increase" and c.get("b") != DAMAGE_MATCHED
        if c.get("mean_diff") is not None
    ]
    primary = [c for c in own if c.get("role") == "primary"]
    seeds = [c for c in own if c["scope"] == "seeds"]
    texts = [c for c in own if c["scope"] == "texts"]
    return next(iter(primary or seeds or texts), None)


def _raw_words(comp: dict[str, Any] | None) -> tuple[str, int]:
    """(what the raw comparison says, its direction: -1 constrained attacked less, +1 more, 0 neither)."""
    if comp is None:
        return "no raw comparison of the arms", 0
    diff = f"{comp['mean_diff']:+.3f} nats/token"
    if not significant(comp):
        return f"the raw comparison of the arms shows no significant difference ({diff})", 0
    if comp["mean_diff"] < 0:
        return f"the constrained arm's loss rose less than the baseline's ({diff}, significant)", -1
    return f"the constrained arm's loss rose more than the baseline's ({diff}, significant)", 1


def _conclusion(direction: int, verdict: str) -> str:
    """Whether the raw difference survives the comparison at equal clean quality."""
    if verdict == OUTSIDE:
        return "the quality control cannot check it (its clean loss lies outside the ladder's range)"
    if direction == 0:
        return {
            MORE: "at equal quality it is more robust, a gain the raw comparison does not show",
            LESS: "at equal quality it is less robust, a loss the raw comparison does not show",
            EQUAL: "at equal quality it is as robust too",
        }[verdict]
    raw, same = ("gain", MORE) if direction < 0 else ("loss", LESS)
    if verdict == same:
        return f"the robustness {raw} survives the quality control"
    if verdict == EQUAL:
        return f"the robustness {raw} does not survive the quality control: a model of equal quality shows it too"
    return f"the robustness {raw} reverses under the quality control"


def quality_control_findings(results: dict[str, Any]) -> list[str]:
    """One sentence per attack with a quality ladder: the raw verdict, the effective robustness
    with its 95% interval, and whether the raw difference survives."""
    section = results.get("robust_or_damaged") or {}
    out = []
    for attack, rec in (section.get("attacks") or {}).items():
        r = (rec.get("arms") or {}).get(CONSTRAINED)
        if r is None:
            continue
        words, direction = _raw_words(_raw_comparison(results["comparisons"], attack))
        effective = f"effective robustness {r['effective']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
        out.append(
            f"{ATTACKS.get(attack, attack)}, quality-controlled: {words}; against models of its clean quality "
            f"it is {r['verdict']} ({effective}): {_conclusion(direction, r['verdict'])}."
        )
    return out
