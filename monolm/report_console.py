"""Printing result tables in the terminal (rich when attached to a terminal, plain otherwise)."""

from __future__ import annotations

from typing import Any


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_rows(title: str, rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col in ("model", "module", "metric") else "right")
    for row in rows:
        table.add_row(*(_fmt(row.get(c)) for c in columns))
    Console(width=160).print(table)
