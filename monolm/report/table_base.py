"""A report table as plain data (a key, a title, columns, rows of strings and a note): what every
table builder returns and both renderers (Markdown, LaTeX) read, so the two can never disagree."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Table:
    """One report table: `key` names it in LaTeX labels and picks its report.md section."""

    key: str
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    note: str = ""
    markdown_only: bool = False  # attacked text and triggers: report.md, not the paper's tables.tex
    left: int = 1  # leading columns aligned left (labels, text); the others are numbers, aligned right


def ci_note(recs: Iterable[dict[str, Any] | None]) -> str:
    """How the intervals of these records were obtained, for a table's note."""
    methods = sorted({r["ci_method"] for r in recs if r and r.get("ci_method")})
    if not methods:
        return "No confidence interval (n=1 seed and no per-example values)."
    return "95% CI: " + "; ".join(methods) + "."
