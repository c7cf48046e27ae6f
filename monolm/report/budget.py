"""Budget curves of the universal attacks in the report: did more budget still help?

Each universal attack stage (UAT, GCG) records in its manifest, per arm, the best optimisation
loss after each step of every restart (`metrics["curves"][arm]["attack"|"control"]`). Stage 7
collects them over seeds, states per attack and arm whether the mean curve saturated
(`monolm.attacks.curves.saturation`: the last 20% of the budget raised the loss by less than 1%
of the total increase) and draws one figure per attack: a curve per arm, restarts (and seeds)
faint, their mean bold, the random control dashed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monolm.attacks.curves import mean_curve, saturation, saturation_sentence
from monolm.report.figure_style import COLORS, new_figure, save_png
from monolm.report.labels import ARMS, ATTACKS

KINDS = {"attack": "", "control": " (random control)"}


def budget_curves(seeds: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, list[list[float]]]]]:
    """{attack: {arm: {"attack"|"control": [curve per seed and restart]}}} from the manifests."""
    out: dict[str, dict[str, dict[str, list[list[float]]]]] = {}
    for data in sorted(seeds, key=lambda d: int(d["seed"])):
        for attack in ATTACKS:
            recorded = ((data.get("stages", {}).get(attack) or {}).get("metrics") or {}).get("curves") or {}
            for arm, kinds in recorded.items():
                for kind, curve_list in (kinds or {}).items():
                    if curve_list:
                        out.setdefault(attack, {}).setdefault(arm, {}).setdefault(kind, []).extend(curve_list)
    return out


def saturation_table(budget: dict[str, Any]) -> list[dict[str, Any]]:
    """One verdict per attack, arm and kind (attack or its control), with its sentence."""
    rows = []
    for attack, arms in budget.items():
        for arm in ARMS:
            for kind, suffix in KINDS.items():
                curve_list = (arms.get(arm) or {}).get(kind)
                if curve_list:
                    sat = saturation(curve_list)
                    label = ATTACKS.get(attack, attack) + suffix
                    rows.append(
                        {
                            "attack": attack,
                            "arm": arm,
                            "kind": kind,
                            **sat,
                            "sentence": saturation_sentence(label, arm, sat),
                        }
                    )
    return rows


def plot_budget(results: dict[str, Any], directory: str | Path) -> dict[str, Path]:
    """`budget-<attack>.png` per universal attack with curves: {name: path}."""
    made = {}
    for attack, arms in (results.get("budget") or {}).items():
        fig = new_figure(6.4, 3.8)
        ax = fig.add_subplot()
        for arm in ARMS:
            for kind, style in (("attack", "-"), ("control", "--")):
                curve_list = (arms.get(arm) or {}).get(kind) or []
                for c in curve_list:
                    ax.plot(
                        [i / max(len(c) - 1, 1) for i in range(len(c))], c, style, color=COLORS[arm], alpha=0.25, lw=0.8
                    )
                mean = mean_curve(curve_list)
                if mean:
                    xs = [i / max(len(mean) - 1, 1) for i in range(len(mean))]
                    ax.plot(xs, mean, style, color=COLORS[arm], lw=2.2, label=f"{arm}{KINDS[kind]}")
        ax.set_xlabel("share of the optimisation budget (steps)")
        ax.set_ylabel("best optimisation loss (nats/token)")
        ax.set_title(f"{ATTACKS.get(attack, attack)}: budget curves (faint: restarts; bold: mean)")
        ax.legend(frameon=False, fontsize=8)
        name = f"budget-{attack}"
        made[name] = save_png(fig, Path(directory) / f"{name}.png")
    return made
