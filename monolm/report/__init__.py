"""Stage 7's numbers and words: per-seed values, across-seed summaries, paired tests between the
arms, and the tables (Markdown, LaTeX/booktabs, CSV) and report built from them.

Why every finding is computed here and nowhere else: the original study's summary named the
constrained model "most robust" by a constant. Here a sentence that states a finding is assembled
from a `monolm.stats.paired_test` result: it names the test and n and says "not significant" when
the test says so. The verdict words ("higher", "lower", "more damage") come from the sign of the
measured difference and its p-value, never from the code.

Conventions:
* Differences are always monotonic − baseline (the constrained arm minus the unconstrained one).
* The primary attack effect is the absolute loss increase in nats per token; the relative
  increase divides by the clean loss and flatters the weaker model, so it comes second.
* Across seeds: mean ± std (ddof=1) and a Student-t 95% interval; paired t-test (primary) and
  Wilcoxon signed-rank test. With one seed the interval comes from the examples (bootstrap over
  attacked texts or evaluation documents) and the paired tests are over examples within that
  seed, which says nothing about the variation between training seeds; the report says so.
* The constrained arm has non-negative FFN weights (W = softplus(V)); it is not a monotone model,
  and the measured monotonicity violation rates are reported next to that statement.

Inputs are plain dicts (see `SeedData` in `monolm.report.seed_inputs`), so the package does no I/O
and can be tested on hand-made numbers. One module per job, in the order the data flows:

* `labels`: arm, model, attack and metric names and how they read (shared with the figures);
* `values`: every number of one seed as flat records, and the per-example arrays;
* `summaries`: across-seed summaries with their confidence intervals;
* `comparisons`: paired tests monotonic − baseline, across seeds and within a seed;
* `sentences`: the findings, the recipe statement and the monotonicity statement;
* `examples`: the UAT triggers and a few HotFlip examples, as the attacks left them;
* `analysis`: all of the above as results.json, plus the headline numbers and console rows;
* `formatting`, `table_builders`, `render`: the tables and their Markdown, LaTeX and CSV forms
  (`table_builders` puts together `effect_tables`, `example_tables` and `model_tables`);
  `first_screen`: the headline table that opens report.md, with the caveats its rows share;
* `grid`, `grid_findings`, `grid_render` (with `grid_terms`): the cross-variant report of a grid
  run, one table per model over its variants and inits, Holm-corrected, with Pareto sets.
"""

from __future__ import annotations

from monolm.report.analysis import SCHEMA_VERSION, analyze, console_rows, headline
from monolm.report.comparisons import Comparison, across_seeds, compare_arms
from monolm.report.cross_cell.analysis import GRID_SCHEMA_VERSION, apply_holm, grid_analysis, pareto_optimal
from monolm.report.cross_cell.render import grid_csv, grid_latex, grid_markdown
from monolm.report.cross_cell.terms import QUALITY, cell_label
from monolm.report.labels import ARM_LABEL, ARMS, ATTACKS, LOWER_IS_BETTER, METRIC_LABEL, MODELS, metric_label
from monolm.report.render import CSV_COLUMNS, latex, markdown, summary_csv, table_latex, table_markdown, tex_escape
from monolm.report.sentences import finding, findings, monotonicity_statement, recipe_statement
from monolm.report.summaries import ALPHA, CONFIDENCE, summarize_values, summary, summary_of, token_weighted_ci
from monolm.report.table_builders import Table, tables
from monolm.report.values import (
    ATTACK_KEYS,
    CONSTRAIN_KEYS,
    EVAL_KEYS,
    EXAMPLE_METRICS,
    TRAIN_KEYS,
    doc_losses,
    example_effects,
    monotonicity_rates,
    seed_values,
    value,
)

__all__ = [
    "across_seeds",
    "ALPHA",
    "ARM_LABEL",
    "ARMS",
    "ATTACK_KEYS",
    "ATTACKS",
    "CONFIDENCE",
    "CONSTRAIN_KEYS",
    "CSV_COLUMNS",
    "EVAL_KEYS",
    "EXAMPLE_METRICS",
    "GRID_SCHEMA_VERSION",
    "LOWER_IS_BETTER",
    "METRIC_LABEL",
    "MODELS",
    "QUALITY",
    "SCHEMA_VERSION",
    "TRAIN_KEYS",
    "Comparison",
    "Table",
    "analyze",
    "apply_holm",
    "cell_label",
    "compare_arms",
    "console_rows",
    "doc_losses",
    "example_effects",
    "finding",
    "findings",
    "grid_analysis",
    "grid_csv",
    "grid_latex",
    "grid_markdown",
    "headline",
    "latex",
    "markdown",
    "metric_label",
    "monotonicity_rates",
    "monotonicity_statement",
    "pareto_optimal",
    "recipe_statement",
    "seed_values",
    "summarize_values",
    "summary",
    "summary_csv",
    "summary_of",
    "table_latex",
    "table_markdown",
    "tables",
    "tex_escape",
    "token_weighted_ci",
    "value",
]
