"""The study's answer in one computed sentence: what the constraint cost in quality, and per
attack whether it changed the damage, each with its primary test. It opens the report, the report
artifact and the end of `monolm run`'s output, so the first thing a reader sees is the answer; the
headline table under it holds the numbers.

Built only from the verdicts and primary tests the headline table shows (`first_screen`), so the
sentence and the table can never disagree."""

from __future__ import annotations

from typing import Any

from monolm.report.first_screen import primary_test, verdict
from monolm.report.formatting import fmt_num, fmt_p
from monolm.report.labels import ATTACKS
from monolm.report.summaries import summary
from monolm.report.verdicts import significant


def _test(comp: dict[str, Any] | None) -> str:
    """`p=0.012, paired t over 3 seeds` (or over the texts of one seed)."""
    if comp is None or comp.get("t_p") is None:
        return "no test"
    where = f"{comp['n']} {comp['scope']}" + (f" of seed {comp['seed']}" if comp["scope"] != "seeds" else "")
    if comp.get("p_holm") is not None:  # a primary test: its verdict rests on the Holm-adjusted p
        return f"Holm-adjusted p={fmt_p(comp['p_holm'])}, paired t over {where}"
    return f"p={fmt_p(comp['t_p'])}, paired t over {where}"


def _quality(results: dict[str, Any]) -> str | None:
    base = summary(results, "evaluate", "baseline", "token_perplexity")
    mono = summary(results, "evaluate", "monotonic", "token_perplexity")
    if not base or not mono or base.get("mean") is None or mono.get("mean") is None or not base["mean"]:
        return None
    change = 100 * (mono["mean"] / base["mean"] - 1)
    # the primary quality test is the test loss's (perplexity is its exponential: the readable cost)
    comp = primary_test(results, "evaluate", "loss") or primary_test(results, "evaluate", "token_perplexity")
    tested = "" if comp is None or significant(comp) else "not significant, "
    verb = "cost" if change >= 0 else "changed"
    values = f"{fmt_num(base['mean'], digits=3)} → {fmt_num(mono['mean'], digits=3)}"
    return f"The constraint {verb} {change:+.0f}% test perplexity ({values}; {tested}{_test(comp)})"


def _attack(results: dict[str, Any], stage: str) -> str | None:
    if summary(results, stage, "baseline", "abs_increase") is None:
        return None
    comp = primary_test(results, stage, "abs_increase")
    diff = (
        ""
        if comp is None or comp.get("mean_diff") is None
        else f"Δ {fmt_num(comp['mean_diff'], sign=True, digits=3)} nats/token, "
    )
    return f"{ATTACKS[stage]} {verdict(stage, comp)} ({diff}{_test(comp)})"


def answer_sentence(results: dict[str, Any]) -> str:
    """ "The constraint cost +37% test perplexity (…); attack damage (constrained − baseline): UAT no
    significant difference (Δ …, p=…, paired t over …), HotFlip …"."""
    quality = _quality(results) or "Quality: no perplexity of both arms"
    attacks = [part for stage in ATTACKS if (part := _attack(results, stage))]
    if not attacks:
        return f"{quality}; no attack results."
    return f"{quality}; attack damage (constrained − baseline): {', '.join(attacks)}."
