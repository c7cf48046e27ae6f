"""The report's tables in reading order, built once from results.json and shared by the Markdown
and LaTeX renderers so the two can never disagree. The builders live with their family:
`effect_tables` (quality, attacks, tests, transfer), `example_tables` (triggers, HotFlip texts) and
`model_tables` (monotonicity, constraint, training, per seed); the table itself: `table_base`."""

from __future__ import annotations

from typing import Any

from monolm.report.effect_tables import attack_table, quality_table, tests_table, transfer_table
from monolm.report.example_tables import hotflip_examples_table, trigger_table
from monolm.report.labels import ATTACKS
from monolm.report.model_tables import constraint_table, monotonicity_table, per_seed_table, training_table
from monolm.report.table_base import Table

__all__ = ["Table", "tables"]


def tables(results: dict[str, Any]) -> list[Table]:
    """The report's tables in reading order, shared by Markdown and LaTeX so the two can never
    disagree; a table without data is left out (the per-seed table is always there)."""
    candidates = [
        quality_table(results),
        *(attack_table(results, attack) for attack in ATTACKS),
        tests_table(results),
        *(transfer_table(results, attack) for attack in ATTACKS),
        trigger_table(results),
        hotflip_examples_table(results),
        monotonicity_table(results),
        constraint_table(results),
        training_table(results),
        per_seed_table(results),
    ]
    return [t for t in candidates if t is not None]
