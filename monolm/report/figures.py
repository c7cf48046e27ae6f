"""Stage 7's figures (PNG, matplotlib): quality per arm, attack damage per arm, training curves.

Why these three: a reader should see at a glance what the constraint costs (perplexity), what it
buys (absolute loss increase under each attack, with the random-candidate control that separates
robustness from gradient masking) and whether the two arms were trained comparably (curves over
the same token axis, `monolm.report.training_figure`). Every figure shows the per-seed values, not
only the means, because with five seeds a mean hides whether one seed drives the effect.

How they are drawn and written (no pyplot, byte-stable PNGs): `monolm.report.figure_style`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.lines import Line2D

from monolm.report.figure_style import COLORS, SHORT, STYLE, n_text, new_figure, panel_row, save_png
from monolm.report.labels import ARMS, ATTACKS, MODELS
from monolm.report.summaries import summary
from monolm.report.training_figure import plot_training
from monolm.report.values import value


def _jitter(n: int, width: float = 0.16) -> np.ndarray:
    """Deterministic horizontal offsets for n per-seed points (no randomness in a figure)."""
    return np.zeros(1) if n == 1 else np.linspace(-width, width, n)


def _p_label(comp: dict[str, Any] | None) -> str | None:
    if comp is None:
        return None
    if comp.get("t_p") is None:
        return f"no test ({comp['scope']}, n={comp['n']})"
    p = comp["t_p"]
    ptext = f"p = {p:.2g}" if p >= 0.001 else "p < 0.001"
    verdict = "" if comp["significant"] else ", n.s."
    return f"paired t, {ptext}{verdict}\n(n = {comp['n']} {comp['scope']})"


def _primary(results: dict[str, Any], stage: str, metric: str) -> dict[str, Any] | None:
    """The comparison the report leads with: across seeds, else the (single) seed's test over examples."""
    comps = [c for c in results["comparisons"] if c["stage"] == stage and c["metric"] == metric]
    across = [c for c in comps if c["scope"] == "seeds"]
    if across:
        return across[0]
    return comps[0] if len(comps) == 1 else None  # the only seed with this measurement


def _bracket(ax: Any, x0: float, x1: float, y: float, text: str, height: float) -> None:
    ax.plot([x0, x0, x1, x1], [y, y + height, y + height, y], color="0.25", lw=0.8, clip_on=False)
    ax.text((x0 + x1) / 2, y + 1.4 * height, text, ha="center", va="bottom", fontsize=7.5, color="0.15")


def _mean_label(recs: Sequence[dict[str, Any] | None]) -> str:
    """Legend text for the mean marker, naming where its interval comes from."""
    methods = [r.get("ci_method") or "" for r in recs if r]
    if any(m.startswith("t-interval") for m in methods):
        return "mean, 95% CI (t over seeds)"
    if any("over texts" in m for m in methods):
        return "mean, 95% CI (bootstrap over texts)"
    if any("over documents" in m for m in methods):
        return "mean, 95% CI (bootstrap over documents)"
    return "mean (no CI: one seed)"


def _mean_ci(
    ax: Any,
    x: float,
    rec: dict[str, Any],
    color: str,
    *,
    marker: str = "D",
    hollow: bool = False,
    label: str | None = None,
    size: float = 7,
) -> None:
    mean = rec["mean"]
    if rec.get("ci_low") is not None:
        err = np.array([[mean - rec["ci_low"]], [rec["ci_high"] - mean]])
        ax.errorbar([x], [mean], yerr=err, fmt="none", ecolor=color, elinewidth=1.8, capsize=5, capthick=1.5, zorder=4)
    ax.plot(
        [x],
        [mean],
        marker=marker,
        ms=size,
        color=color,
        mfc="white" if hollow else color,
        mew=1.6,
        ls="none",
        zorder=5,
        label=label,
    )


def plot_perplexity(results: dict[str, Any], path: str | Path) -> Path | None:
    """Held-out token perplexity per model: each seed's value, the mean and its 95% CI; the two
    trained arms' points of the same seed are joined (the paired design)."""
    models = [m for m in MODELS if summary(results, "evaluate", m, "token_perplexity")]
    if not models:
        return None
    seeds = results["meta"]["seeds"]
    offsets = _jitter(len(seeds))
    with matplotlib.rc_context(STYLE):
        fig = new_figure(4.2, 3.4)
        ax = fig.add_subplot()
        for i, model in enumerate(models):
            rec = summary(results, "evaluate", model, "token_perplexity")
            ys = [value(results, s, "evaluate", model, "token_perplexity") for s in seeds]
            xs = [i + offsets[k] for k, y in enumerate(ys) if y is not None]
            if len(seeds) > 1:
                ax.scatter(
                    xs,
                    [y for y in ys if y is not None],
                    s=18,
                    color=COLORS[model],
                    alpha=0.55,
                    lw=0,
                    zorder=3,
                    label="per seed" if i == 0 else None,
                )
            _mean_ci(
                ax,
                i + (0.32 if len(seeds) > 1 else 0.0),
                rec,
                COLORS[model],
                label=_mean_label([rec]) if i == 0 else None,
            )
        if "baseline" in models and "monotonic" in models:
            ib, im = models.index("baseline"), models.index("monotonic")
            for k, s in enumerate(seeds):
                yb = value(results, s, "evaluate", "baseline", "token_perplexity")
                ym = value(results, s, "evaluate", "monotonic", "token_perplexity")
                if yb is not None and ym is not None:
                    ax.plot([ib + offsets[k], im + offsets[k]], [yb, ym], color="0.6", lw=0.6, alpha=0.6, zorder=2)
            top = max(_top(results, "evaluate", m, "token_perplexity") for m in ("baseline", "monotonic"))
            bottom, upper = _limits(ax)
            comp = _primary(results, "evaluate", "token_perplexity") or _primary(results, "evaluate", "doc_loss")
            label = _p_label(comp)
            if label:
                span = upper - bottom
                _bracket(ax, ib, im + 0.32, top + 0.04 * span, label, 0.03 * span)
                ax.set_ylim(bottom, max(upper, top + 0.30 * span))
        ax.set_xticks(range(len(models)), [SHORT[m] for m in models])
        ax.set_xlim(-0.5, len(models) - 0.2)
        ax.set_ylabel("Held-out token perplexity")
        ax.set_title(f"Quality: held-out perplexity ({n_text(len(seeds))})")
        fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=2, frameon=False)
        return save_png(fig, Path(path))


def _top(results: dict[str, Any], stage: str, model: str, metric: str) -> float:
    rec = summary(results, stage, model, metric)
    if rec is None:
        return -np.inf
    highs = [v for v in rec["values"]] + [rec["ci_high"] if rec.get("ci_high") is not None else rec["mean"]]
    return float(max(highs))


def _limits(ax: Any) -> tuple[float, float]:
    ax.relim()
    ax.autoscale_view()
    return ax.get_ylim()


def _seed_points(
    ax: Any,
    results: dict[str, Any],
    attack: str,
    arm: str,
    prefix: str,
    x0: float,
    seeds: Sequence[int],
    *,
    hollow: bool,
) -> None:
    """Each seed's absolute loss increase with its own CI over texts (nothing with one seed: the
    one seed is the mean, and its CI is over texts)."""
    if len(seeds) == 1:
        return
    offsets = _jitter(len(seeds), 0.12)
    for k, s in enumerate(seeds):
        y = value(results, s, attack, arm, prefix + "abs_increase")
        if y is None:
            continue
        lo = value(results, s, attack, arm, prefix + "abs_increase_ci_low")
        hi = value(results, s, attack, arm, prefix + "abs_increase_ci_high")
        x = x0 - 0.14 + offsets[k] * 0.6
        if lo is not None and hi is not None:
            ax.errorbar(
                [x],
                [y],
                yerr=[[y - lo], [hi - y]],
                fmt="none",
                ecolor=COLORS[arm],
                alpha=0.35,
                elinewidth=0.8,
                zorder=2,
            )
        ax.scatter(
            [x],
            [y],
            s=14,
            color="white" if hollow else COLORS[arm],
            edgecolors=COLORS[arm],
            alpha=0.7,
            lw=0.8,
            zorder=3,
        )


def _attack_panel(ax: Any, results: dict[str, Any], attack: str) -> int:
    """One attack's panel: per arm the gradient attack and, where there is one, its random
    control beside it; the paired test as a bracket. Returns the number of seeds shown."""
    # only the seeds that have this attack (a stage can be missing in some seeds)
    seeds = sorted({s for arm in ARMS for s in (summary(results, attack, arm, "abs_increase") or {}).get("seeds", [])})
    has_control = any(summary(results, attack, arm, "control_abs_increase") for arm in ARMS)
    variants = [("", 0.0, False)] + ([("control_", 0.42, True)] if has_control else [])
    for i, arm in enumerate(ARMS):
        for prefix, shift, hollow in variants:
            rec = summary(results, attack, arm, prefix + "abs_increase")
            if rec is None:
                continue
            x0 = i + shift - (0.21 if has_control else 0.0)
            _seed_points(ax, results, attack, arm, prefix, x0, seeds, hollow=hollow)
            _mean_ci(
                ax,
                x0 + (0.08 if len(seeds) > 1 else 0.0),
                rec,
                COLORS[arm],
                marker="s" if hollow else "D",
                hollow=hollow,
            )
    ax.axhline(0.0, color="0.3", lw=0.8, zorder=1)
    label = _p_label(_primary(results, attack, "abs_increase"))
    if label:
        bottom, upper = _limits(ax)
        span = upper - bottom
        top = max(_top(results, attack, arm, "abs_increase") for arm in ARMS)
        x_b = (0.08 if len(seeds) > 1 else 0.0) - (0.21 if has_control else 0.0)
        _bracket(ax, x_b, x_b + 1.0, top + 0.05 * span, label, 0.03 * span)
        ax.set_ylim(min(bottom, 0 - 0.05 * span), max(upper, top + 0.34 * span))
    ax.set_xticks(range(len(ARMS)), [SHORT[a] for a in ARMS])
    ax.set_xlim(-0.6, len(ARMS) - 0.4)
    ax.set_ylabel("Absolute loss increase (nats/token)")
    n_texts = summary(results, attack, "baseline", "n_texts")
    texts = f", {n_texts['mean']:.0f} texts/seed" if n_texts and n_texts["mean"] is not None else ""
    ax.set_title(f"{ATTACKS[attack]} ({n_text(len(seeds))}{texts})")
    return len(seeds)


def plot_attacks(results: dict[str, Any], path: str | Path) -> Path | None:
    """Absolute loss increase (nats/token) per arm, one panel per attack: each seed's value with
    its own CI over texts, the across-seed mean with its 95% CI, and for HotFlip the
    query-only random-candidate control (hollow markers) beside the gradient attack."""
    attacks = [a for a in ATTACKS if any(summary(results, a, arm, "abs_increase") for arm in ARMS)]
    if not attacks:
        return None
    with matplotlib.rc_context(STYLE):
        fig, n_seeds = panel_row(attacks, 3.6, 3.6, lambda ax, attack: _attack_panel(ax, results, attack))
        recs = [summary(results, a, arm, "abs_increase") for a in attacks for arm in ARMS]
        handles = [Line2D([], [], marker="D", color="0.3", ls="none", ms=6, label=_mean_label(recs))]
        if max(n_seeds) > 1:
            handles.append(
                Line2D(
                    [],
                    [],
                    marker="o",
                    color="0.3",
                    ls="none",
                    ms=4,
                    alpha=0.7,
                    label="per seed (thin bar: its CI over texts)",
                )
            )
        if any(summary(results, a, arm, "control_abs_increase") for a in attacks for arm in ARMS):
            handles.append(
                Line2D(
                    [],
                    [],
                    marker="s",
                    color="0.3",
                    mfc="white",
                    ls="none",
                    ms=6,
                    label="random-candidate control (HotFlip)",
                )
            )
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False)
        return save_png(fig, Path(path))


def render_all(
    results: dict[str, Any], histories: dict[int, dict[str, dict[str, Any]]], directory: str | Path
) -> dict[str, Path]:
    """Every figure that has data, as {name: path} (perplexity.png, attacks.png, training.png)."""
    directory = Path(directory)
    made = {
        "perplexity": plot_perplexity(results, directory / "perplexity.png"),
        "attacks": plot_attacks(results, directory / "attacks.png"),
        "training": plot_training(histories, directory / "training.png"),
    }
    return {name: p for name, p in made.items() if p is not None}
