"""Stage 7's training figure: validation perplexity and training loss of both arms over the same
token axis, so a reader sees whether the two arms were trained comparably. One thin line per seed
and, where the seeds share their evaluation points, their mean in bold."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.ticker import EngFormatter

from monolm.report.figure_style import COLORS, STYLE, n_text, panel_row, save_png
from monolm.report.labels import ARM_LABEL, ARMS


def history_curves(history: dict[str, Any]) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], bool]:
    """(x, value) series from a training history and whether x is tokens seen (else steps):
    `val_perplexity` from the eval entries and `train_loss` from the log entries. Eval entries
    carry only the step, so their token count comes from the summary's batch × sequence length
    (or the log entries' tokens per step)."""
    log = [e for e in history.get("log", []) if "step" in e]
    evals = [e for e in history.get("eval", []) if "step" in e]
    info = history.get("summary", {})
    per_step = None
    if info.get("effective_batch_size") and info.get("seq_len"):
        per_step = info["effective_batch_size"] * info["seq_len"]
    else:
        with_tokens = [e for e in log if e.get("tokens_seen") and e["step"]]
        if with_tokens:
            per_step = with_tokens[-1]["tokens_seen"] / with_tokens[-1]["step"]

    def xs(entries: Sequence[dict[str, Any]]) -> np.ndarray:
        return np.asarray(
            [
                e["tokens_seen"]
                if e.get("tokens_seen") is not None and per_step
                else (e["step"] * per_step if per_step else e["step"])
                for e in entries
            ],
            dtype=float,
        )

    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    loss = [e for e in log if e.get("train_loss") is not None]
    if loss:
        out["train_loss"] = (xs(loss), np.asarray([e["train_loss"] for e in loss], dtype=float))
    ppl = [e for e in evals if e.get("val_perplexity") is not None]
    if ppl:
        out["val_perplexity"] = (xs(ppl), np.asarray([e["val_perplexity"] for e in ppl], dtype=float))
    return out, per_step is not None


def plot_training(histories: dict[int, dict[str, dict[str, Any]]], path: str | Path) -> Path | None:
    """Validation perplexity and training loss vs tokens seen for both arms: one thin line per
    seed and, where the seeds share their evaluation points, the mean over seeds in bold."""
    parsed = {seed: {arm: history_curves(h) for arm, h in arms.items()} for seed, arms in histories.items()}
    curves = {seed: {arm: c for arm, (c, _) in arms.items()} for seed, arms in parsed.items()}
    token_axis = all(known for arms in parsed.values() for _, known in arms.values())
    panels = [("val_perplexity", "Validation perplexity"), ("train_loss", "Training loss (nats/token)")]
    panels = [p for p in panels if any(p[0] in c for arms in curves.values() for c in arms.values())]
    if not panels:
        return None
    n = len(histories)
    with matplotlib.rc_context(STYLE | {"axes.grid.axis": "both"}):
        fig, _ = panel_row(
            panels, 3.6, 3.3, lambda ax, panel: _training_panel(ax, *panel, curves, token_axis=token_axis, n=n)
        )
        handles, labels = fig.axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=2, frameon=False)
        return save_png(fig, Path(path))


Curves = dict[int, dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]]  # {seed: {arm: {key: (x, y)}}}


def _training_panel(ax: Any, key: str, label: str, curves: Curves, *, token_axis: bool, n: int) -> None:
    """One quantity (`key`) of both arms: each seed's line, their mean where the seeds align."""
    for arm in ARMS:
        _arm_lines(ax, arm, key, [c[arm][key] for c in curves.values() if arm in c and key in c[arm]])
    ax.set_xlabel("Tokens seen" if token_axis else "Optimizer step")
    if token_axis:
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_ylabel(label)
    ys = np.concatenate([c[arm][key][1] for c in curves.values() for arm in c if key in c[arm]])
    if ys.size and ys.min() > 0 and ys.max() / ys.min() > 20:
        ax.set_yscale("log")
    ax.set_title(f"{label.split(' (')[0]} ({n_text(n)})")


def _arm_lines(ax: Any, arm: str, key: str, series: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """One arm's seeds, thin, and their mean in bold where they share the x values."""
    for x, y in series:
        ax.plot(
            x,
            y,
            color=COLORS[arm],
            lw=0.8,
            alpha=0.35 if len(series) > 1 else 1.0,
            marker="o" if key == "val_perplexity" else None,
            ms=2.5,
        )
    if len(series) > 1 and all(len(s[0]) == len(series[0][0]) and np.allclose(s[0], series[0][0]) for s in series):
        ax.plot(
            series[0][0],
            np.mean([s[1] for s in series], axis=0),
            color=COLORS[arm],
            lw=2.0,
            label=f"{ARM_LABEL[arm]}, mean of {len(series)}",
        )
    elif series:
        ax.plot([], [], color=COLORS[arm], lw=2.0, label=ARM_LABEL[arm])
