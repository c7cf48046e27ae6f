"""How numbers read in the report's sentences and tables: 4 significant digits, percentages,
p-values, "mean ± std", "[low, high]", and "—" for a number that is missing or not finite."""

from __future__ import annotations

import math
from typing import Any


def fmt_num(x: float | None, *, sign: bool = False, digits: int = 4) -> str:
    """A number with `digits` significant digits; integers from 1000 on with thousands separators."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if float(x).is_integer() and abs(x) >= 1000:
        return f"{int(x):+,}" if sign else f"{int(x):,}"
    return f"{x:+.{digits}g}" if sign else f"{x:.{digits}g}"


def fmt_pct(x: float | None) -> str:
    """A fraction as a percentage with 3 significant digits."""
    return "—" if x is None else f"{100 * x:.3g}%"


def fmt_p(p: float | None) -> str:
    """A p-value: 3 significant digits, scientific notation below 0.001."""
    if p is None:
        return "—"
    return f"{p:.3g}" if p >= 0.001 else f"{p:.1e}"


def fmt_mean_std(rec: dict[str, Any] | None, pct: bool = False) -> str:
    """ "mean ± std" of a summary record ("mean" alone when there is no std)."""
    if rec is None or rec["mean"] is None:
        return "—"
    f = fmt_pct if pct else fmt_num
    return f(rec["mean"]) + (f" ± {f(rec['std'])}" if rec["std"] is not None else "")


def fmt_ci(rec: dict[str, Any] | None, pct: bool = False) -> str:
    """ "[low, high]" of a summary record's confidence interval."""
    if rec is None or rec.get("ci_low") is None:
        return "—"
    f = fmt_pct if pct else fmt_num
    return f"[{f(rec['ci_low'])}, {f(rec['ci_high'])}]"
