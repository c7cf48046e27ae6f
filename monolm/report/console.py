"""Printing result tables in the terminal with rich, always as a rich table 160 columns wide; rich
itself leaves out colours and styles when the output is not a terminal (a pipe or a log file)."""

from __future__ import annotations

from typing import Any


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_rows(title: str, rows: list[dict[str, Any]]) -> None:
    """One table with a column per key of any row (first-seen order): the model, module and metric
    columns left-aligned, the others right-aligned; floats with 4 significant digits, "-" for None."""
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
