"""The cross-variant report's figures (PNG), from `monolm.report.grid_analysis`'s dict.

`tradeoff-<model>.png`: what each constraint variant costs against what it buys, one panel per
attack (the attacks measure different things, so their gains are not pooled): quality cost on x
(Δ test loss, constrained − baseline, nats/token) and robustness gain on y (baseline − constrained
absolute loss increase, nats/token: up is harder to attack). One marker per variant (colour) and
init (shape) at its mean, with 95% CI whiskers in both directions; the single seeds faint behind
it; the baseline as a star at the origin; the Pareto front (low cost, high gain, the baseline
included as a candidate) as a dashed staircase with the points on it ringed. With one seed there
are no faint points: the interval is over documents or texts of that seed.

`size.png` (only when the grid has models of at least two known sizes): robustness gain against
the number of parameters (log scale), one line per variant (init), one panel per attack.

Drawn as every report figure is (`monolm.report.figure_style`): `Figure` with the Agg canvas (no
pyplot), the same style, fixed metadata (same inputs, same bytes), written atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter

from monolm.report.cross_cell.terms import SIZE_FIGURE, fmt_params, row_name, tradeoff_names
from monolm.report.figure_style import STYLE, panel_row, save_png

PALETTE = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666", "#1f78b4")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h")
X_LABEL = "Quality cost: Δ test loss,\nconstrained − baseline (nats/token)"
Y_LABEL = "Robustness gain: baseline − constrained\nabsolute loss increase (nats/token)"


class Styles:
    """One colour per variant and one marker per init, the same in every figure of a grid."""

    def __init__(self, grid: dict[str, Any]) -> None:
        rows = [row for entry in grid["models"] for row in entry["rows"]]
        variants = list(dict.fromkeys(row["variant"] for row in rows))
        inits = list(dict.fromkeys(row["init"] for row in rows))
        self.color = {v: PALETTE[i % len(PALETTE)] for i, v in enumerate(variants)}
        self.marker = {v: MARKERS[i % len(MARKERS)] for i, v in enumerate(inits)}

    def of(self, variant: str, init: str) -> tuple[str, str]:
        return self.color[variant], self.marker[init]


def _err(est: dict[str, Any]) -> list[list[float]] | None:
    if est.get("ci_low") is None or est.get("ci_high") is None:
        return None
    return [[est["value"] - est["ci_low"]], [est["ci_high"] - est["value"]]]


def _placed(entry: dict[str, Any], attack: str) -> list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """(row, Δ loss, gain) of every row that has both numbers under `attack`."""
    out = []
    for row in entry["rows"]:
        delta = row["quality"]["delta_loss"]
        gain = (row["attacks"].get(attack) or {}).get("gain")
        if delta and gain and delta["value"] is not None and gain["value"] is not None:
            out.append((row, delta, gain))
    return out


def _seed_points(ax: Any, row: dict[str, Any], delta: dict[str, Any], gain: dict[str, Any], style: Styles) -> None:
    """Each seed's (Δ loss, gain), faint, behind the mean (nothing with one seed)."""
    if row["n_seeds"] < 2:
        return
    xs = {p["seed"]: p["value"] for p in delta.get("per_seed") or []}
    ys = {p["seed"]: p["value"] for p in gain.get("per_seed") or []}
    seeds = sorted(set(xs) & set(ys))
    color, marker = style.of(row["variant"], row["init"])
    ax.plot([xs[s] for s in seeds], [ys[s] for s in seeds], marker=marker, ms=4, ls="none", color=color, alpha=0.3)


def _front(ax: Any, entry: dict[str, Any], attack: str, placed: Sequence[tuple[Any, Any, Any]]) -> None:
    """The Pareto front as a staircase through its points (sorted by cost), the baseline included."""
    points = [(d["value"], g["value"]) for row, d, g in placed if row["pareto"].get(attack)]
    if entry["pareto"][attack]["baseline_optimal"]:
        points.append((0.0, 0.0))
    points.sort()
    if len(points) >= 2:
        xs, ys = zip(*points, strict=True)
        ax.step(xs, ys, where="post", color="0.2", lw=1.0, ls="--", zorder=3)
    for row, d, g in placed:
        if row["pareto"].get(attack):
            ax.plot([d["value"]], [g["value"]], marker="o", ms=14, mfc="none", mec="0.2", mew=1.0, zorder=4)


# label placements: (x, y offset in points, horizontal alignment): above right, above left, below
# right, below left
LABEL_SLOTS = ((6, 5, "left"), (-6, 5, "right"), (6, -12, "left"), (-6, -12, "right"))


def label_offsets(
    points: Sequence[tuple[float, float]], xlim: tuple[float, float], ylim: tuple[float, float]
) -> list[tuple[int, int, str]]:
    """A placement per point's label so that the labels of points close together do not print over
    each other: each label takes the first slot that no earlier label near it has taken. Near:
    within a label's reach in the panel (a quarter of its width, a twentieth of its height)."""
    xspan, yspan = (xlim[1] - xlim[0]) or 1.0, (ylim[1] - ylim[0]) or 1.0
    taken: list[tuple[float, float, tuple[int, int, str]]] = []
    out = []
    for x, y in points:
        close = {slot for px, py, slot in taken if abs(x - px) / xspan < 0.25 and abs(y - py) / yspan < 0.05}
        slot = next((s for s in LABEL_SLOTS if s not in close), LABEL_SLOTS[0])
        taken.append((x, y, slot))
        out.append(slot)
    return out


def _tradeoff_panel(ax: Any, entry: dict[str, Any], attack: str, name: str, style: Styles) -> None:
    ax.axhline(0, color="0.55", lw=0.8, ls=":", zorder=1)
    ax.axvline(0, color="0.55", lw=0.8, ls=":", zorder=1)
    placed = _placed(entry, attack)
    for row, delta, gain in placed:
        _seed_points(ax, row, delta, gain, style)
    _front(ax, entry, attack, placed)
    for row, delta, gain in placed:
        color, marker = style.of(row["variant"], row["init"])
        x, y = delta["value"], gain["value"]
        ax.errorbar([x], [y], xerr=_err(delta), yerr=_err(gain), fmt="none", ecolor=color, elinewidth=1.4, capsize=3)
        ax.plot([x], [y], marker=marker, ms=7.5, color=color, mec="white", mew=0.8, ls="none", zorder=5)
    points = [(d["value"], g["value"]) for _, d, g in placed]
    for (row, _, _), point, (dx, dy, align) in zip(
        placed, points, label_offsets(points, ax.get_xlim(), ax.get_ylim()), strict=True
    ):
        color = style.of(row["variant"], row["init"])[0]
        ax.annotate(
            row_name(row), point, xytext=(dx, dy), textcoords="offset points", ha=align, fontsize=7, color=color
        )
    ax.plot([0], [0], marker="*", ms=14, color="black", mec="white", mew=0.8, ls="none", zorder=6)
    ax.annotate("baseline", (0, 0), xytext=(6, -11), textcoords="offset points", fontsize=7.5)
    n = sorted({row["n_seeds"] for row, _, _ in placed})
    seeds = "/".join(str(k) for k in n) or "0"
    ax.set_title(f"{name} ({seeds} seed{'s' if n != [1] else ''})")
    ax.set_xlabel(X_LABEL)
    ax.set_ylabel(Y_LABEL)
    ax.grid(True, axis="both", alpha=0.3, lw=0.6)
    ax.margins(0.12)  # room for the labels beside the points


def _tradeoff_legend(entry: dict[str, Any], style: Styles) -> list[Line2D]:
    handles = []
    for row in entry["rows"]:
        color, marker = style.of(row["variant"], row["init"])
        what = "mean, 95% CI" if row["n_seeds"] > 1 else "one seed, 95% CI over documents / texts"
        handles.append(Line2D([], [], marker=marker, color=color, ls="none", ms=7, label=f"{row_name(row)}: {what}"))
    handles.append(Line2D([], [], marker="*", color="black", ls="none", ms=11, label="baseline (origin)"))
    if any(row["n_seeds"] > 1 for row in entry["rows"]):
        handles.append(Line2D([], [], marker="o", color="0.4", alpha=0.3, ls="none", ms=4, label="single seeds"))
    handles.append(Line2D([], [], marker="o", ms=10, mfc="none", mec="0.2", color="0.2", ls="--", label="Pareto front"))
    return handles


def plot_tradeoff(grid: dict[str, Any], entry: dict[str, Any], path: str | Path, style: Styles) -> Path | None:
    """One model's trade-off figure, one panel per attack; None when no row has both numbers."""
    attacks = [a for a in entry["attacks"] if _placed(entry, a)]
    if not attacks:
        return None
    with matplotlib.rc_context(STYLE):
        fig, _ = panel_row(
            attacks, 4.2, 4.4, lambda ax, attack: _tradeoff_panel(ax, entry, attack, grid["attacks"][attack], style)
        )
        handles = _tradeoff_legend(entry, style)
        fig.legend(handles=handles, loc="outside lower center", ncol=min(2, len(handles)), frameon=False)
        fig.suptitle(f"{entry['model']}: what each constraint variant costs and buys")
        return save_png(fig, Path(path))


def _size_panel(ax: Any, series: Sequence[dict[str, Any]], attack: str, name: str, style: Styles) -> list[float]:
    """Gain against parameters, one line per (variant, init), dodged a little in log space."""
    models: dict[float, str] = {}
    ax.axhline(0, color="0.55", lw=0.8, ls=":")
    for j, s in enumerate(series):
        points = s["points"].get(attack) or []
        points = [p for p in points if p["value"] is not None]
        if not points:
            continue
        color, marker = style.of(s["variant"], s["init"])
        dodge = 1 + 0.025 * (j - (len(series) - 1) / 2)
        xs = [p["parameters"] * dodge for p in points]
        lows = [p["value"] - p["ci_low"] if p.get("ci_low") is not None else 0.0 for p in points]
        highs = [p["ci_high"] - p["value"] if p.get("ci_high") is not None else 0.0 for p in points]
        ax.errorbar(
            xs, [p["value"] for p in points], yerr=[lows, highs], color=color, marker=marker, ms=6, capsize=3, lw=1.2
        )
        models.update({p["parameters"]: p["model"] for p in points})
    ax.set_xscale("log")
    ticks = sorted(models)
    ax.set_xticks(ticks, [f"{fmt_params(t)}\n{models[t]}" for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("Model parameters (log scale)")
    ax.set_ylabel("Robustness gain (nats/token;\nup = harder to attack)")
    ax.set_title(name)
    return ticks


def plot_size(grid: dict[str, Any], path: str | Path, style: Styles) -> Path | None:
    """Robustness gain against model size per variant (init); None without two model sizes."""
    across = grid.get("across_models")
    if not across:
        return None
    attacks = [a for a in grid["attacks"] if any(len(s["points"].get(a) or []) >= 2 for s in across["series"])]
    if not attacks:
        return None
    with matplotlib.rc_context(STYLE):
        fig, _ = panel_row(
            attacks,
            4.0,
            3.8,
            lambda ax, attack: _size_panel(ax, across["series"], attack, grid["attacks"][attack], style),
        )
        handles = [
            Line2D(
                [],
                [],
                marker=style.of(s["variant"], s["init"])[1],
                color=style.of(s["variant"], s["init"])[0],
                label=f"{s['variant']} ({s['init']})",
            )
            for s in across["series"]
        ]
        fig.legend(handles=handles, loc="outside lower center", ncol=min(3, len(handles)), frameon=False)
        fig.suptitle("Robustness gain (baseline − constrained absolute loss increase) by model size")
        return save_png(fig, Path(path))


def render_grid_plots(grid: dict[str, Any], directory: str | Path) -> dict[str, Path]:
    """Every figure of the cross-variant report: {name: path}, names `tradeoff-<model>` (one per
    model with data) and `size` (when the grid has two or more model sizes); files `<name>.png`."""
    directory = Path(directory)
    style = Styles(grid)
    out: dict[str, Path] = {}
    names = tradeoff_names([entry["model"] for entry in grid["models"]])
    for entry in grid["models"]:
        path = plot_tradeoff(grid, entry, directory / f"{names[entry['model']]}.png", style)
        if path is not None:
            out[names[entry["model"]]] = path
    size = plot_size(grid, directory / f"{SIZE_FIGURE}.png", style)
    if size is not None:
        out[SIZE_FIGURE] = size
    return out
