"""Result rows (from `ResultsStore.query`, `runs` or `compare`) as a text table for the terminal."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        text = json.dumps(value, separators=(",", ":"), default=str)
        return text if len(text) <= 60 else text[:57] + "..."
    return str(value)


def format_table(
    rows: Sequence[dict[str, Any]], *, columns: Sequence[str] | None = None, title: str | None = None, width: int = 200
) -> str:
    """Render result rows (from `query`, `runs` or `compare`) as a text table for the terminal;
    columns default to the keys of the first row, in order."""
    if not rows:
        return "(no results)"
    from rich.console import Console
    from rich.table import Table as RichTable

    columns = list(columns or rows[0].keys())
    table = RichTable(title=title, show_lines=False)
    for column in columns:
        numeric = any(
            isinstance(row.get(column), (int, float)) and not isinstance(row.get(column), bool) for row in rows
        )
        table.add_column(column, justify="right" if numeric else "left", overflow="fold")
    for row in rows:
        table.add_row(*(_cell(row.get(column)) for column in columns))
    buffer = io.StringIO()
    Console(file=buffer, width=width, color_system=None, force_terminal=False, soft_wrap=False).print(table)
    return buffer.getvalue().rstrip("\n")
