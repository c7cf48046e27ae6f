"""Printing result tables in the terminal: as wide as the terminal, text columns (arms, modules,
IDs) never split (`monolm.store.display`); rich itself leaves out colours and styles when the
output is not a terminal (a pipe or a log file)."""

from __future__ import annotations

from typing import Any

from monolm.store.display import render_table


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_rows(title: str, rows: list[dict[str, Any]]) -> None:
    """One table with a column per key of any row (first-seen order); floats with 4 significant
    digits, "-" for None."""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    print(render_table(rows, columns, title=title, cell=_fmt))
