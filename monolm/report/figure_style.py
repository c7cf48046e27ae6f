"""What every figure of the reports shares: colours, the matplotlib style, a canvas without pyplot
and a byte-stable PNG writer.

Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas directly: no pyplot, so no
global backend switch and no GUI, and a notebook that imports monolm keeps its own backend. Files
are written with `monolm.core.artifacts.atomic_path`, without a version string in their metadata,
so identical inputs give identical files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from monolm.core.artifacts import atomic_path

COLORS = {"base": "#7f7f7f", "baseline": "#1f77b4", "monotonic": "#d95f02"}
SHORT = {"base": "base", "baseline": "baseline", "monotonic": "monotonic\n(non-neg. FFN)"}
STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8.5,
    "ytick.labelsize": 8.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.grid.axis": "y",
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "savefig.dpi": 200,
}
DPI = 200
METADATA = {"Software": None}  # no version string: identical inputs give identical files

T = TypeVar("T")
R = TypeVar("R")


def new_figure(width: float, height: float) -> Figure:
    """A figure of `width` × `height` inches on its own Agg canvas (constrained layout)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def panel_row(
    items: Sequence[T], panel_width: float, height: float, draw: Callable[[Any, T], R]
) -> tuple[Figure, list[R]]:
    """A figure with one panel per item side by side (`panel_width` inches each, plus a margin),
    each drawn by `draw(axes, item)`; returns the figure and what `draw` returned per panel."""
    fig = new_figure(panel_width * len(items) + 0.4, height)
    axes = fig.subplots(1, len(items), squeeze=False)[0]
    return fig, [draw(ax, item) for ax, item in zip(axes, items, strict=True)]


def save_png(fig: Figure, path: Path) -> Path:
    """Write `fig` to `path` atomically as a PNG whose bytes depend only on what was drawn."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata=METADATA)
    return path


def n_text(n: int) -> str:
    """'n = 1 seed' / 'n = 3 seeds', for figure titles."""
    return f"n = {n} seed{'s' if n != 1 else ''}"
