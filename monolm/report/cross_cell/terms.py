"""What the parts of the cross-variant report share: how a cell and a row are named, the measure
families the Holm correction runs over, and how an estimate (a number with its interval and n)
and a model size read. The analysis (`grid`), its sentences (`grid_findings`), its tables
(`grid_render`) and its figures (`monolm.report.cross_cell.figures`) all take them from here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from monolm.report.formatting import fmt_num, fmt_p, fmt_pct
from monolm.report.labels import ATTACKS

QUALITY = "quality"  # the family of the Δ test loss tests; the attack families are named by their stage


def cell_label(model: str, variant: str, init: str) -> str:
    """The name of one cell in grid.json, the report's links and the CSV: `<model>/<variant>-<init>`."""
    return f"{model}/{variant}-{init}"


def file_slug(model: str) -> str:
    """A model name as part of a file name (`tradeoff-<slug>.png`): letters, digits, `.`, `_`, `-`."""
    slug = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in model).strip("-.")
    return slug or "model"


def tradeoff_names(models: Sequence[str]) -> dict[str, str]:
    """Each model's trade-off figure name (`tradeoff-<slug>`, without `.png`), unique even when two
    model names share a slug."""
    out: dict[str, str] = {}
    for model in models:
        name, i = f"tradeoff-{file_slug(model)}", 2
        while name in out.values():
            name, i = f"tradeoff-{file_slug(model)}-{i}", i + 1
        out[model] = name
    return out


SIZE_FIGURE = "size"  # robustness gain against model size, across models


def row_name(row: dict[str, Any]) -> str:
    """A row within its model's table and sentences: `variant (init)`."""
    return f"{row['variant']} ({row['init']})"


def family_label(family: str) -> str:
    """A measure family in words."""
    if family == QUALITY:
        return "Δ test loss"
    return f"{ATTACKS.get(family, family)} absolute loss increase"


def family_tests(rows: Sequence[dict[str, Any]], family: str) -> list[dict[str, Any] | None]:
    """The paired test (constrained − baseline) of each row in one family; None where a row has none."""
    if family == QUALITY:
        return [row["quality"]["delta_loss"] for row in rows]
    return [(row["attacks"].get(family) or {}).get("difference") for row in rows]


def unit_text(n: int | None, unit: str) -> str:
    """ "3 seeds", "1 seed", "40 texts"."""
    if n is None:
        return "n unknown"
    return f"{n} {unit[:-1] if n == 1 and unit.endswith('s') else unit}"


def fmt_value(x: float | None, *, sign: bool = False, pct: bool = False) -> str:
    return fmt_pct(x) if pct else fmt_num(x, sign=sign)


def fmt_interval(est: dict[str, Any] | None, *, pct: bool = False) -> str:
    """ "[low, high]", or "—" without an interval."""
    if not est or est.get("ci_low") is None:
        return "—"
    return f"[{fmt_value(est['ci_low'], pct=pct)}, {fmt_value(est['ci_high'], pct=pct)}]"


def fmt_estimate(est: dict[str, Any] | None, *, sign: bool = False, pct: bool = False, with_n: bool = True) -> str:
    """ "+0.06 (95% CI [0.04, 0.08], n=3 seeds)" for sentences; "—" without a value."""
    if not est or est.get("value") is None:
        return "—"
    text = fmt_value(est["value"], sign=sign, pct=pct)
    parts = []
    if est.get("ci_low") is not None:
        parts.append(f"95% CI {fmt_interval(est, pct=pct)}")
    if with_n:
        parts.append(f"n={unit_text(est.get('n'), est.get('unit', 'seeds'))}")
    return text + (f" ({', '.join(parts)})" if parts else "")


def fmt_pvalues(test: dict[str, Any] | None) -> str:
    """ "p=0.012, Holm p=0.036" (uncorrected first)."""
    if not test or test.get("t_p") is None:
        return "no test"
    return f"p={fmt_p(test['t_p'])}, Holm p={fmt_p(test.get('p_holm'))}"


def fmt_params(n: int | float | None) -> str:
    """A parameter count for people: 410M, 1.4B, 3.2k."""
    if n is None:
        return "size unknown"
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:g}"
