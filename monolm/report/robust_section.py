"""The report's "Robust or damaged?" section: per attack, each arm's loss increase against its
clean test loss beside the quality ladder's trend (`monolm.report.robustness`), as a figure, a
table of effective robustness with 95% intervals and verdicts, and a sentence per verdict.

Inputs are the seeds' plain dicts (`monolm.report.seed_inputs.read_seed`): `ladder` (the ladder stage's
ladder.json), `evaluation` (per-document losses of base, baseline and arms) and `per_example`
(per-text losses under each attack).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monolm.report.labels import ARM_LABEL as _ARM_LABEL
from monolm.report.labels import ATTACKS
from monolm.report.robustness import SeedPoint, effective_robustness

REFERENCE_ARM = "baseline"  # the unconstrained arm: a point of the trend, not a tested arm
DAMAGE_ARM = "damage"  # the damage-matched arm's name in the section
ARM_LABEL = {**_ARM_LABEL, DAMAGE_ARM: "damage-matched (baseline + noise, equal validation loss)"}
TITLE = "Robust or damaged?"
CAPTION = (
    "Loss increase under each attack vs clean test loss: the quality ladder (grey), base and baseline, the fitted "
    "line with its 95% band, and each constrained arm (bars: 95% CIs both ways)"
)


def _doc_point(evaluation: dict[str, Any], increase: list[float]) -> SeedPoint:
    docs = evaluation["per_doc"]
    return SeedPoint.of([d["nll"] for d in docs], [d["tokens"] for d in docs], increase)


def _increase(record: dict[str, Any]) -> list[float]:
    return [a - c for c, a in zip(record["clean"], record["attacked"], strict=True)]


def _seed_models(data: dict[str, Any], attack: str) -> tuple[dict[str, SeedPoint], dict[str, SeedPoint]] | None:
    """(references, arms) of one seed under `attack`, or None when the seed lacks any of them."""
    ladder, evaluation = data.get("ladder") or {}, data.get("evaluation") or {}
    per_example = (data.get("per_example") or {}).get(attack) or {}
    models = evaluation.get("models") or {}
    if not ladder.get("enabled") or REFERENCE_ARM not in per_example:
        return None
    refs = {
        r["name"]: _doc_point(r["evaluation"], _increase(r["attacks"][attack]))
        for r in ladder["rungs"]
        if attack in r["attacks"]
    }
    if not refs or not all(m in models and models[m].get("per_doc") for m in per_example):
        return None
    refs[REFERENCE_ARM] = _doc_point(models[REFERENCE_ARM], _increase(per_example[REFERENCE_ARM]))
    arms = {m: _doc_point(models[m], _increase(rec)) for m, rec in per_example.items() if m != REFERENCE_ARM}
    damage = data.get("damage") or {}  # the damage-matched arm (controls.damage), on the same documents and texts
    record = (damage.get("attacks") or {}).get(attack) or {}
    if record.get("clean") and (damage.get("test") or {}).get("per_doc"):
        point = _doc_point(damage["test"], _increase(record))
        first = next(iter(arms.values()), None)
        if first is None or (point.increase.size, point.doc_nll.size) == (first.increase.size, first.doc_nll.size):
            arms[DAMAGE_ARM] = point
    return refs, arms


def robust_or_damaged(seeds: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Per attack: every arm's effective robustness and the trend, as JSON; None without a ladder."""
    out: dict[str, Any] = {}
    for attack in ATTACKS:
        per_seed = [_seed_models(d, attack) for d in seeds]
        if not per_seed or any(p is None for p in per_seed):
            continue
        refs = {name: {d["seed"]: p[0][name] for d, p in zip(seeds, per_seed, strict=True)} for name in per_seed[0][0]}
        arms = {name: {d["seed"]: p[1][name] for d, p in zip(seeds, per_seed, strict=True)} for name in per_seed[0][1]}
        results, trend = effective_robustness(refs, arms)
        out[attack] = {"arms": {a: r.to_json() for a, r in results.items()}, "trend": trend}
    if not out:
        return None
    return {
        "attacks": out,
        "n_seeds": len(seeds),
        "method": "linear fit; percentile bootstrap over documents, texts, seeds",
    }


def _fmt(v: float) -> str:
    return f"{v:+.3f}"


def section_lines(section: dict[str, Any] | None, plot: str | None) -> list[str]:
    """The report's section: what it asks, the figure, the table and one sentence per arm."""
    if not section:
        return []
    lines = [
        f"## {TITLE}",
        "",
        "A model that is worse at its job is often less sensitive to an attack only because it models text less "
        "sharply. Effective robustness compares each arm's loss increase with what reference models of the same "
        "clean quality show (the quality ladder: the same model at earlier stages of pre-training, with the base "
        "model and the baseline): measured increase − the ladder's prediction at the arm's clean loss, nats/token; "
        "negative means the loss rose less than quality predicts. 95% percentile bootstrap intervals over test "
        "documents, attacked texts" + (" and seeds" if section["n_seeds"] > 1 else "") + ".",
        "",
    ]
    if plot:
        lines += [f"![{CAPTION}]({plot})", "", f"_{CAPTION}._", ""]
    lines += [
        "| attack | arm | clean loss | increase | predicted | effective robustness [95% CI] | verdict |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    sentences = []
    for attack, rec in section["attacks"].items():
        for arm, r in rec["arms"].items():
            ci = f"{_fmt(r['effective'])} [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]"
            lines.append(
                f"| {ATTACKS.get(attack, attack)} | {ARM_LABEL.get(arm, arm)} | {r['clean_loss']:.3f} | "
                f"{r['increase']:.3f} | {r['predicted']:.3f} | {ci} | {r['verdict']} |"
            )
            lo, hi = rec["trend"]["range"]
            where = (
                f" (clean loss {r['clean_loss']:.3f}; the ladder spans {lo:.3f} to {hi:.3f})"
                if not r["in_range"]
                else ""
            )
            sentences.append(
                f"{ATTACKS.get(attack, attack)}: the {ARM_LABEL.get(arm, arm)} arm is {r['verdict']}{where}."
            )
    return [*lines, "", *[f"- {s}" for s in sentences], ""]


def plot_robustness(section: dict[str, Any] | None, path: str | Path) -> Path | None:
    """One panel per attack: loss increase vs clean loss, ladder points, fitted band, arms."""
    if not section:
        return None
    import matplotlib

    from monolm.report.figure_style import STYLE, panel_row, save_png

    attacks = list(section["attacks"])
    with matplotlib.rc_context(STYLE):
        fig, _ = panel_row(attacks, 3.8, 3.6, lambda ax, attack: _panel(ax, attack, section["attacks"][attack]))
        return save_png(fig, Path(path))


def _panel(ax, attack: str, rec: dict[str, Any]) -> None:
    trend = rec["trend"]
    ax.fill_between(trend["grid"], *trend["band"], color="0.85", lw=0, label="ladder fit, 95% band")
    ax.plot(trend["grid"], trend["fit"], color="0.4", lw=1)
    styles = {"base": ("s", "0.2"), REFERENCE_ARM: ("D", "tab:blue")}
    for name, (x, y) in trend["points"].items():
        arm = ("P", "tab:orange") if name == DAMAGE_ARM else ("*", "tab:red")
        marker, color = styles.get(name, ("o", "0.55")) if name in trend["references"] else arm
        xerr = [[x - trend["x_ci"][name][0]], [trend["x_ci"][name][1] - x]]
        yerr = [[y - trend["y_ci"][name][0]], [trend["y_ci"][name][1] - y]]
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=marker, color=color, ms=7 if marker == "*" else 5, lw=0.8)
        ax.annotate(
            ARM_LABEL.get(name, name).split(" (")[0], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    ax.set_title(ATTACKS.get(attack, attack))
    ax.set_xlabel("clean test loss (nats/token)")
    ax.set_ylabel("loss increase under attack (nats/token)")


HEADLINE_NOTE = (
    "Rows 'vs a model of equal quality': the Baseline column holds the quality ladder's predicted increase at the "
    "constrained arm's clean loss, the Difference is its effective robustness, with a bootstrap CI and p "
    "(see Robust or damaged?)."
)


def headline_rows(section: dict[str, Any] | None) -> list[list[str]]:
    """The headline table's quality-matched rows: per attack and arm, the ladder's prediction at
    the arm's clean loss (in the baseline's column: the reference), the measured increase, their
    difference (effective robustness) with its bootstrap CI and p, and the verdict."""
    rows = []
    for attack, rec in ((section or {}).get("attacks") or {}).items():
        for arm, r in rec["arms"].items():
            label = f"{ATTACKS.get(attack, attack)} increase vs a model of equal quality (ladder; bootstrap p)"
            if arm != "monotonic":
                label += f", {ARM_LABEL.get(arm, arm)}"
            rows.append(
                [
                    label,
                    f"{r['predicted']:.3f}",
                    f"{r['increase']:.3f}",
                    _fmt(r["effective"]),
                    f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]" if r["in_range"] else "—",
                    f"{r['p_value']:.3g}" if r["in_range"] else "—",
                    r["verdict"],
                    f"{section['n_seeds']} seed(s), texts and documents resampled",
                ]
            )
    return rows
