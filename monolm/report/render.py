"""Rendering: report.md (the headline table, then provenance, findings, tables, plots, methods and the
config), tables.tex (booktabs) and summary.csv, all from results.json and the shared tables."""

from __future__ import annotations

import csv
import io
from typing import Any

from monolm.report.answer import answer_sentence
from monolm.report.cross_cell.cell_verdict import grid_verdict_lines
from monolm.report.first_screen import headline_table
from monolm.report.formatting import fmt_pct
from monolm.report.labels import ATTACKS
from monolm.report.robust_section import section_lines
from monolm.report.summaries import ALPHA
from monolm.report.table_builders import Table, tables


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def table_markdown(t: Table) -> str:
    lines = [
        f"**{t.title}**",
        "",
        "| " + " | ".join(_md_cell(c) for c in t.columns) + " |",
        "|" + "|".join("---" if i < t.left else "---:" for i in range(len(t.columns))) + "|",
    ]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
    if t.note:
        lines += ["", f"_{t.note}_"]
    return "\n".join(lines)


_TEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "−": r"$-$",
    "Δ": r"$\Delta$",
    "α": r"$\alpha$",
    "‖": r"$\Vert$",
    "—": "---",
    "≥": r"$\geq$",
    "·": r"$\cdot$",
    ">": r"$>$",
    "<": r"$<$",
    "|": r"$\vert$",
}


def tex_escape(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in text)


def table_latex(t: Table) -> str:
    """A booktabs table (needs \\usepackage{booktabs}); the caption states n."""
    spec = "l" + "r" * (len(t.columns) - 1)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        rf"\caption{{{tex_escape(t.title)}}}",
        rf"\label{{tab:{t.key}}}",
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(tex_escape(c) for c in t.columns) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join(tex_escape(c) for c in row) + r" \\" for row in t.rows]
    lines.append(r"\bottomrule")
    lines.append(r"\end{tabular}")
    if t.note:
        lines.append(rf"\par\smallskip\footnotesize {tex_escape(t.note)}")
    lines.append(r"\end{table}")
    return "\n".join(lines)


def latex(results: dict[str, Any]) -> str:
    meta = results["meta"]
    head = (
        f"% monolm results: {meta['run_name']} (config digest {meta['config_digest']}, "
        f"code {meta['code_revision']}). Requires \\usepackage{{booktabs}}.\n"
    )
    headline = [t for t in (headline_table(results),) if t]
    return head + "\n\n".join(table_latex(t) for t in [*headline, *tables(results)] if not t.markdown_only) + "\n"


CSV_COLUMNS = (
    "stage",
    "model",
    "metric",
    "n",
    "mean",
    "std",
    "ci_low",
    "ci_high",
    "ci_method",
    "seeds",
    "values",
    "variant",
    "preset",
    "recipe",
    "config_digest",
    "code_revision",
)


def summary_csv(results: dict[str, Any]) -> str:
    """One row per (stage, model, metric): n seeds, mean, std, CI and the per-seed values."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for rec in results["summaries"]:
        row = {k: rec.get(k) for k in CSV_COLUMNS}
        row["seeds"] = " ".join(str(s) for s in rec["seeds"])
        row["values"] = " ".join(repr(v) for v in rec["values"])
        writer.writerow(row)
    return buffer.getvalue()


# table key -> report.md section (tables of one section follow each other); an attack's tables
# (`attack-<name>`, `transfer-<name>`) by `section_of`, for every attack the registry has now
ATTACK_SECTIONS = {"attack": "Robustness", "transfer": "Transfer"}
SECTIONS = {
    "quality": "Quality",
    "tests": "Paired tests",
    "triggers": "Attack examples",
    "hotflip-examples": "Attack examples",
    "monotonicity": "The constraint",
    "constraint": "The constraint",
    "training": "Training",
    "per-seed": "Per-seed values",
}
PLOT_CAPTIONS = {
    "perplexity": "Held-out token perplexity per arm (points: seeds; bars: 95% CI)",
    "attacks": "Absolute loss increase under attack per arm, nats/token "
    "(95% CIs; HotFlip and GCG with their random controls)",
    "training": "Training curves of both arms (validation perplexity and training loss vs tokens seen)",
}


def section_of(key: str, title: str) -> str:
    """The report.md section of table `key` (its own title when it has none)."""
    kind, _, attack = key.partition("-")
    return ATTACK_SECTIONS[kind] if kind in ATTACK_SECTIONS and attack in ATTACKS else SECTIONS.get(key, title)


def caption_of(plot: str, budget: dict[str, Any] | None = None) -> str:
    """A figure's caption; a budget figure names the dashed random control only where `budget`
    (results["budget"]) holds control curves for that attack (UAT has no control)."""
    kind, _, attack = plot.partition("-")
    if kind == "budget" and attack in ATTACKS:
        arms = (budget or {}).get(attack) or {}
        dashed = "; dashed: the random control" if any((a or {}).get("control") for a in arms.values()) else ""
        return (
            f"{ATTACKS[attack]} budget curves: best optimisation loss vs share of the budget per arm "
            f"(faint: restarts; bold: their mean{dashed})"
        )
    return PLOT_CAPTIONS.get(plot, plot)


def _provenance_lines(results: dict[str, Any], config_path: str) -> list[str]:
    """The title, the recipe statement, and what was run: model, seeds, status, config and code."""
    meta = results["meta"]
    n = len(meta["seeds"])
    revisions = meta.get("stage_revisions")
    stage_revisions = (
        f" (stage outputs were produced at: {', '.join('`' + r + '`' for r in revisions)})"
        if revisions and revisions != [meta["code_revision"]]
        else ""
    )
    return [
        "## What was run",
        "",
        "- Question: does constraining the FFN weights to be non-negative make the model harder to attack, "
        "and what does it cost?",
        f"- Model: `{meta['model']}` (preset `{meta['preset']}`); constraint variant `{meta['variant']}` "
        f"(init `{meta.get('init')}`): non-negative FFN weights.",
        f"- Seeds: {', '.join(str(s) for s in meta['seeds'])} (n = {n}).",
        *([f"- {results['held_out_statement']}"] if results.get("held_out_statement") else []),
        f"- Run ID `{meta['run_id']}` in the results store (`monolm results --run {meta['run_id']}`).",
        *([f"- **Status: partial** — {meta['incomplete']}."] if meta.get("incomplete") else []),
        f"- Config digest `{meta['config_digest']}`; full config: [`{config_path}`]({config_path}) next to this "
        "report (also at the end of it).",
        f"- Code revision: `{meta['code_revision']}`" + stage_revisions + ".",
        "",
    ]


def _headline_lines(results: dict[str, Any]) -> list[str]:
    """The title, the answer in one sentence (in a grid's cell report after the grid's verdict,
    which counts), the recipe in one line, and the headline table with the caveats its rows share."""
    lines = [f"# monolm results: {results['meta']['run_name']}", ""]
    grid = grid_verdict_lines(results)
    if grid:
        lines += [*grid, f"This cell's own tests: {answer_sentence(results)}", ""]
    else:
        lines += [f"**{answer_sentence(results)}**", ""]
    lines += [f"> {results['recipe_statement']}", ""]
    table = headline_table(results)
    return [*lines, table_markdown(table), ""] if table else lines


def _findings_lines(results: dict[str, Any]) -> list[str]:
    lines = ["## Findings", ""]
    lines += [f"- {s}" for s in results["findings"]] or ["- No comparisons could be computed."]
    return [*lines, "", f"- {results['monotonicity_statement']}", ""]


def _table_lines(results: dict[str, Any]) -> list[str]:
    """Every table under its section heading."""
    lines: list[str] = []
    done: set[str] = set()
    for t in tables(results):
        heading = section_of(t.key, t.title)
        if heading not in done:
            lines += [f"## {heading}", ""]
            done.add(heading)
        lines += [table_markdown(t), ""]
    return lines


def _plot_lines(plots: dict[str, str], budget: dict[str, Any] | None) -> list[str]:
    """Every figure ({name: path relative to report.md}) with its caption."""
    if not plots:
        return []
    lines = ["## Plots", ""]
    for name, rel in plots.items():
        caption = caption_of(name, budget)
        lines += [f"![{caption}]({rel})", "", f"_{caption}._", ""]
    return lines


def _methods_lines(meta: dict[str, Any]) -> list[str]:
    return [
        "## Methods",
        "",
        "- Differences are monotonic − baseline. Across seeds: mean ± std (ddof = 1), Student-t 95% CI, paired "
        "t-test (primary, decides significance) and Wilcoxon signed-rank test (scipy.stats). Within a seed: the "
        "same paired tests over the attacked texts (identical texts, same order, for both arms).",
        "- With one seed, confidence intervals are bootstrap (BCa, 10,000 resamples, seeded) over texts or "
        "documents; they describe one trained pair of models, not variation between training seeds.",
        "- Attack effects are measured on the original text tokens only (trigger and flipped tokens are never "
        "scored). The absolute loss increase (nats/token) is primary; relative increase and success rate "
        f"(relative increase above {fmt_pct(meta.get('success_threshold'))}) are secondary.",
        f"- Significance level α = {ALPHA}. Verdicts rest on the primary measures (test loss; each attack's "
        "absolute loss increase), Holm-corrected over this report's primary tests; other tests are secondary "
        "and uncorrected. With fewer than 3 seeds no across-seed test or interval is computed.",
        "",
    ]


def markdown(results: dict[str, Any], *, plots: dict[str, str], config_yaml: str, config_path: str) -> str:
    """report.md: the headline table first, then what was run, findings, tables, plots, methods,
    config."""
    plots = dict(plots)
    lines = [
        *_headline_lines(results),
        *section_lines(results.get("robust_or_damaged"), plots.pop("robustness", None)),
        *_provenance_lines(results, config_path),
        *_findings_lines(results),
        *_table_lines(results),
        *_plot_lines(plots, results.get("budget")),
        *_methods_lines(results["meta"]),
        "## Configuration",
        "",
        "```yaml",
        config_yaml.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
