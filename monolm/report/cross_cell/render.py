"""The cross-variant report's files, from `grid_analysis`'s dict: report.md (the sign convention,
findings, per model a quality table and one table per attack (`tables.py`), figures, links to
every cell's own report, methods with the multiple-comparison note, once), tables.tex (booktabs,
the same tables) and summary.csv (one row per model, variant, init and
measure). The tables are built once as `Table`s and shared by the Markdown and LaTeX renderers."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from typing import Any

from monolm.report.cross_cell.tables import SIGN_CONVENTION, grid_tables, model_tables
from monolm.report.cross_cell.terms import SIZE_FIGURE, family_label, fmt_params, row_name, tradeoff_names
from monolm.report.render import table_latex, table_markdown
from monolm.report.robust_grid import grid_section_lines


def holm_note(grid: dict[str, Any]) -> str:
    """The multiple-comparison statement of the report."""
    families = ", ".join(family_label(f) for f in grid["correction"]["families"])
    return (
        f"With several variants per model, the paired tests against the baseline are corrected for multiple "
        f"comparisons with Holm's step-down method: over the (variant, init) rows of one model, separately for "
        f"each measure family ({families}), on the paired t-test's p. Tables show the uncorrected p with the "
        f"Holm-adjusted one in parentheses; a difference is called significant after correction when the "
        f"adjusted p is below α = {grid['alpha']:g}. Holm controls the family-wise error rate under any "
        "dependence between the tests (the variants of a seed share one baseline, so their tests are "
        "correlated). Each cell's own report and results.json keep the uncorrected p-values."
    )


def figure_caption(grid: dict[str, Any], name: str) -> str:
    """The caption of a figure `render_grid_plots` names `name`."""
    models = {v: k for k, v in tradeoff_names([m["model"] for m in grid["models"]]).items()}
    if name in models:
        return (
            f"{models[name]}: quality cost (Δ test loss, constrained − baseline, nats/token; right = worse) against "
            "robustness gain (baseline − constrained absolute loss increase, nats/token; up = harder to attack), "
            "one panel per attack. Markers: mean per variant (init) with 95% CI whiskers in both directions; faint "
            "points: single seeds; star at the origin: the baseline; dashed line and rings: the Pareto front"
        )
    if name == SIZE_FIGURE:
        return (
            "Robustness gain (baseline − constrained absolute loss increase, nats/token) against model size "
            "(parameters, log scale), one line per variant (init), one panel per attack, with 95% CIs"
        )
    return name


def _cell_links(entry: dict[str, Any], cell_reports: dict[str, str]) -> list[str]:
    links = [
        f"[{row_name(row)}]({cell_reports[row['label']]})" for row in entry["rows"] if row["label"] in cell_reports
    ]
    return ["Each cell's own report: " + " · ".join(links), ""] if links else []


def _model_sections(grid: dict[str, Any], cell_reports: dict[str, str]) -> Iterator[str]:
    for entry in grid["models"]:
        size = f" ({fmt_params(entry['parameters'])} parameters)" if entry["parameters"] is not None else ""
        seeds = ", ".join(str(s) for s in entry["seeds"])
        yield from [f"## {entry['model']}{size}", "", f"Seeds: {seeds}.", ""]
        for table in model_tables(grid, entry):
            yield from [table_markdown(table), ""]
        yield from _cell_links(entry, cell_reports)


def _methods(grid: dict[str, Any]) -> list[str]:
    return [
        "## Methods",
        "",
        f"- {SIGN_CONVENTION} Both are paired within one model and seed; the baseline is trained once per "
        "model and seed and shared by all variants. Across seeds: paired t-test (primary) and Wilcoxon "
        "signed-rank test over seeds, Student-t 95% CI. With one seed: the same tests over the test documents "
        "(quality) or the attacked texts (attacks) of that seed, which say nothing about variation between "
        "training seeds.",
        "- Quality cost: Δ test loss (nats/token); perplexity ratio = exp(Δ loss). Robustness gain under an "
        "attack (nats/token): the negative of the paired test's constrained − baseline difference, with its "
        "interval mirrored; its p is that test's.",
        f"- {holm_note(grid)}",
        "- Pareto front: the variants (and the baseline at the origin) that no other point beats in both quality "
        "cost and robustness gain, per attack, on the point estimates.",
        "",
    ]


def grid_markdown(grid: dict[str, Any], *, plots: dict[str, str], cell_reports: dict[str, str]) -> str:
    """report.md of a grid run. `plots`: {figure name (`render_grid_plots`' keys): path relative to
    the report}; `cell_reports`: {cell label (`cell_label`): path of that cell's report.md}."""
    n_cells = len(grid["cells"])
    axes = "; ".join(f"{axis}s: {', '.join(f'`{v}`' for v in values)}" for axis, values in grid["axes"].items())
    lines = [
        "# monolm cross-variant report",
        "",
        f"> {n_cells} cell{'s' if n_cells != 1 else ''} ({axes}): what each constraint variant costs in "
        "quality and buys in robustness, against the baseline of the same model and seed.",
        "",
        f"{SIGN_CONVENTION} Tests are Holm-corrected per model (Methods).",
        "",
        *grid_section_lines(grid.get("robust_or_damaged")),
        "## Findings",
        "",
        *([f"- {s}" for s in grid["findings"]] or ["- No comparisons could be computed."]),
        "",
        *_model_sections(grid, cell_reports),
    ]
    if plots:
        lines += ["## Figures", ""]
        for name, rel in plots.items():
            caption = figure_caption(grid, name)
            lines += [f"![{caption}]({rel})", "", f"_{caption}._", ""]
    return "\n".join([*lines, *_methods(grid)])


def grid_latex(grid: dict[str, Any]) -> str:
    """tables.tex of a grid run: one booktabs table per model, set full width (table*, scaled to
    \\textwidth: needs booktabs and graphicx)."""
    head = "% monolm cross-variant report. Requires \\usepackage{booktabs} and \\usepackage{graphicx}.\n"
    return head + "\n\n".join(_wide(table_latex(t)) for t in grid_tables(grid)) + "\n"


def _wide(tex: str) -> str:
    """A `table_latex` table spanning both columns, its tabular scaled to the text width."""
    tex = tex.replace(r"\begin{table}[t]", r"\begin{table*}[t]").replace(r"\end{table}", r"\end{table*}")
    tex = tex.replace(r"\begin{tabular}", "\\resizebox{\\textwidth}{!}{%\n\\begin{tabular}", 1)
    return tex.replace(r"\end{tabular}", "\\end{tabular}}", 1)


CSV_COLUMNS = (
    "model",
    "parameters",
    "variant",
    "init",
    "cell",
    "measure",
    "attack",
    "value",
    "ci_low",
    "ci_high",
    "n",
    "unit",
    "ci_method",
    "t_p",
    "wilcoxon_p",
    "p_holm",
    "significant",
    "significant_holm",
    "pareto_optimal",
)


def _measures(row: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any] | None]]:
    """(measure, attack, estimate) of one row, in table order."""
    quality = row["quality"]
    for measure in ("perplexity_ratio", "delta_loss", "baseline_perplexity", "constrained_perplexity"):
        yield measure, "", quality[measure]
    for attack, block in row["attacks"].items():
        for measure in (
            "constrained_abs_increase",
            "baseline_abs_increase",
            "constrained_success_rate",
            "baseline_success_rate",
            "difference",
            "gain",
        ):
            yield measure, attack, block[measure]


def grid_csv(grid: dict[str, Any]) -> str:
    """summary.csv of a grid run: one row per (model, variant, init, measure) with its value, 95% CI,
    n and unit; tests also with uncorrected and Holm-adjusted p. Measures: see `CSV_COLUMNS`."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for entry in grid["models"]:
        for row in entry["rows"]:
            for measure, attack, est in _measures(row):
                if est is None:
                    continue
                pareto = row["pareto"].get(attack) if attack and measure == "gain" else None
                writer.writerow(
                    {
                        **{k: est.get(k) for k in CSV_COLUMNS if k in est},
                        "model": row["model"],
                        "parameters": entry["parameters"],
                        "variant": row["variant"],
                        "init": row["init"],
                        "cell": row["label"],
                        "measure": measure,
                        "attack": attack,
                        "pareto_optimal": pareto,
                    }
                )
    return buffer.getvalue()
