"""Result rows (from `ResultsStore.query`, `runs` or `compare`, or stage 7's console rows) as a
text table that fits the terminal: as wide as the terminal (`shutil.get_terminal_size`), text
columns (run IDs, names, arms) never wrapped, so an ID is never split across lines; numbers and
headers wrap or shrink instead."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Sequence
from typing import Any

FALLBACK_WIDTH = 120  # not a terminal (a pipe, a log file) and no COLUMNS: wide enough for a run ID


def terminal_width() -> int:
    return shutil.get_terminal_size((FALLBACK_WIDTH, 24)).columns


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


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _rich(rows, columns, texts, title, width) -> str:
    from rich.console import Console
    from rich.table import Table as RichTable

    table = RichTable(title=title, show_lines=False)
    for i, column in enumerate(columns):
        values = [row.get(column) for row in rows]
        if all(_is_number(v) for v in values):
            table.add_column(column, justify="right", overflow="fold")
        else:
            longest = max((len(t[i]) for t in texts), default=0)
            table.add_column(column, justify="left", no_wrap=True, min_width=longest)
    for text in texts:
        table.add_row(*text)
    buffer = io.StringIO()
    Console(file=buffer, width=width, color_system=None, force_terminal=False).print(table)
    return buffer.getvalue().rstrip("\n")


def _heading_lines(pairs: Sequence[str], width: int) -> list[str]:
    """`name: value` pairs joined by "; " into indented lines of at most `width`, a pair never split
    (textwrap would cut `started / due` or `experiment/seed-42` at a space or hyphen); a pair longer
    than the line gets a line of its own."""
    lines: list[str] = []
    for pair in pairs:
        if lines and len(lines[-1]) + 2 + len(pair) <= width:
            lines[-1] += f"; {pair}"
        else:
            lines.append(f"  {pair}")
    return lines


def render_table(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    *,
    title: str | None = None,
    width: int | None = None,
    cell=_cell,
) -> str:
    """A table as text: numeric columns right-aligned, text columns left-aligned and never wrapped,
    at most `width` (default: the terminal's) wide. When the table cannot fit, the rows are
    grouped by their first column, named once above each group's table (a run ID on its own line
    rather than cut)."""
    width = width or terminal_width()
    texts = [[cell(row.get(column)) for column in columns] for row in rows]
    natural = _rich(rows, columns, texts, title, 10_000)
    if max(map(len, natural.splitlines()), default=0) <= width or len(columns) < 2:
        return _rich(rows, columns, texts, title, width)
    groups: dict[str, list[int]] = {}
    for i, text in enumerate(texts):
        groups.setdefault(text[0], []).append(i)
    # Columns with one value within every group (a run's created time and status) go to its heading.
    numeric = {j for j, c in enumerate(columns) if all(_is_number(r.get(c)) for r in rows)}
    same = [
        j
        for j in range(1, len(columns))
        if j not in numeric and all(len({texts[i][j] for i in m}) == 1 for m in groups.values())
    ]
    keep = [j for j in range(1, len(columns)) if j not in same] or same[-1:]
    out = [title] if title else []
    for value, members in groups.items():
        out.append(f"{columns[0]}: {value}")
        first = texts[members[0]]
        if [j for j in same if j not in keep]:
            out.extend(_heading_lines([f"{columns[j]}: {first[j]}" for j in same if j not in keep], width))
        sub = [rows[i] for i in members]
        out.append(_rich(sub, [columns[j] for j in keep], [[texts[i][j] for j in keep] for i in members], None, width))
    return "\n".join(out)


def format_table(
    rows: Sequence[dict[str, Any]],
    *,
    columns: Sequence[str] | None = None,
    title: str | None = None,
    width: int | None = None,
) -> str:
    """Render result rows as a text table for the terminal; columns default to the keys of the
    first row, in order."""
    if not rows:
        return "(no results)"
    return render_table(rows, list(columns or rows[0].keys()), title=title, width=width)
