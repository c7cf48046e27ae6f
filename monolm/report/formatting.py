"""How numbers read in the report's sentences and tables: 4 significant digits (trailing zeros
kept, so a column reads 0.2800 next to 0.2549, not 0.28), percentages with 3, p-values, "mean ±
std", "[low, high]", and "—" for a number that is missing or not finite."""

from __future__ import annotations

import math
from typing import Any


def _sig(x: float, digits: int, sign: bool) -> str:
    """`digits` significant digits with trailing zeros kept (no dangling point: 100, not 100.)."""
    text = f"{x:+#.{digits}g}" if sign else f"{x:#.{digits}g}"
    mantissa, e, exponent = text.partition("e")
    return mantissa.rstrip(".") + e + exponent


def fmt_num(x: float | None, *, sign: bool = False, digits: int = 4) -> str:
    """A number with `digits` significant digits; whole numbers as integers, from 1000 on with
    thousands separators."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if float(x).is_integer():
        if abs(x) >= 1000:
            return f"{int(x):+,}" if sign else f"{int(x):,}"
        if abs(x) < 10**digits:
            return f"{int(x):+d}" if sign else str(int(x))
    return _sig(float(x), digits, sign)


def fmt_pct(x: float | None) -> str:
    """A fraction as a percentage with 3 significant digits (0% and 100% as such)."""
    if x is None:
        return "—"
    pct = 100 * x
    return f"{int(pct)}%" if float(pct).is_integer() and pct in (0, 100) else _sig(pct, 3, False) + "%"


def fmt_p(p: float | None) -> str:
    """A p-value: 3 significant digits, scientific notation below 0.001."""
    if p is None:
        return "—"
    return f"{p:.3g}" if p >= 0.001 else f"{p:.1e}"


def fmt_setting(x: float | None) -> str:
    """A configured value as it was set (0.0005 as 0.0005, not 0.0005000)."""
    return "—" if x is None else f"{x:g}"


def fmt_mean_std(rec: dict[str, Any] | None, pct: bool = False, setting: bool = False) -> str:
    """ "mean ± std" of a summary record ("mean" alone when there is no std)."""
    if rec is None or rec["mean"] is None:
        return "—"
    f = fmt_pct if pct else fmt_setting if setting else fmt_num
    return f(rec["mean"]) + (f" ± {f(rec['std'])}" if rec["std"] is not None else "")


def fmt_ci(rec: dict[str, Any] | None, pct: bool = False) -> str:
    """ "[low, high]" of a summary record's confidence interval."""
    if rec is None or rec.get("ci_low") is None:
        return "—"
    f = fmt_pct if pct else fmt_num
    return f"[{f(rec['ci_low'])}, {f(rec['ci_high'])}]"
