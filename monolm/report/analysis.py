"""The whole analysis of stage 7 as one JSON-able dict (the content of results.json), and the
headline numbers and console rows handed back with the stage result."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from monolm.report.budget import budget_curves, saturation_table
from monolm.report.comparisons import compare_arms
from monolm.report.damage_arm import apply_damage_holm, damage_comparisons, damage_findings, damage_seed_values
from monolm.report.examples import attack_examples
from monolm.report.held_out import held_out_facts, held_out_statement, tag_parts
from monolm.report.labels import ARMS, ATTACKS, MODELS
from monolm.report.quality_control import quality_control_findings
from monolm.report.robust_section import robust_or_damaged
from monolm.report.sentences import findings, monotonicity_statement, recipe_statement
from monolm.report.summaries import ALPHA, CONFIDENCE, summarize_values, summary
from monolm.report.values import seed_values
from monolm.report.verdicts import apply_primary_holm, significant

SCHEMA_VERSION = 1


def analyze(seeds: Sequence[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """Everything stage 7 reports, as one JSON-able dict (the content of results.json).

    Every per-seed value, summary and comparison carries the run's variant, preset, recipe,
    config digest and code revision, and the data part it was measured on (`part`: train,
    validation, test or attack), so a number copied out of the file keeps its provenance.
    """
    seeds = sorted(seeds, key=lambda d: int(d["seed"]))
    tags = {k: meta[k] for k in ("variant", "preset", "recipe", "config_digest", "code_revision")}
    values = [v for data in seeds for v in (*seed_values(data), *damage_seed_values(data))]
    summaries = summarize_values(values, seeds)
    comparisons = [c.to_json() for c in (*compare_arms(values, seeds), *damage_comparisons(values, seeds))]
    apply_primary_holm(comparisons, ALPHA)  # roles (primary/secondary) and Holm over the primary family
    apply_damage_holm(comparisons, ALPHA)  # constrained vs damage-matched: a family of its own
    for records in (values, summaries, comparisons):
        tag_parts(records)  # which data part (train, validation, test, attack) each number is from
    results: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "run_name": meta["run_name"],
        "run_id": meta["run_id"],
        "meta": meta,
        "alpha": ALPHA,
        "confidence": CONFIDENCE,
        "values": [{**v, **tags} for v in values],
        "summaries": [{**s, **tags} for s in summaries],
        "comparisons": [{**c, **tags} for c in comparisons],
    }
    results["held_out"] = held_out_facts(seeds)
    results["held_out_statement"] = held_out_statement(results["held_out"])
    results["examples"] = attack_examples(seeds)
    results["budget"] = budget_curves(seeds)
    results["saturation"] = saturation_table(results["budget"])
    results["robust_or_damaged"] = robust_or_damaged(seeds)
    results["findings"] = (
        findings(results)
        + quality_control_findings(results)
        + damage_findings(results)
        + [row["sentence"] for row in results["saturation"]]
    )
    results["recipe_statement"] = recipe_statement(meta, values)
    results["monotonicity_statement"] = monotonicity_statement(results)
    return results


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """Headline numbers (means over seeds, and the primary tests' p-values) for the stage result."""
    out: dict[str, Any] = {"n_seeds": len(results["meta"]["seeds"])}
    for model in MODELS:
        rec = summary(results, "evaluate", model, "token_perplexity")
        if rec:
            out[f"{model}_token_perplexity"] = rec["mean"]
    for attack in ATTACKS:
        for arm in ARMS:
            for metric in ("abs_increase", "rel_increase", "success_rate"):
                rec = summary(results, attack, arm, metric)
                if rec:
                    out[f"{arm}_{attack}_{metric}"] = rec["mean"]
    for comp in results["comparisons"]:
        if (
            comp["scope"] == "seeds"
            and comp["b"] == "baseline"
            and comp["metric"] in ("token_perplexity", "loss", "abs_increase")
        ):
            key = f"{comp['stage']}_{comp['metric']}"
            out[f"{key}_diff"] = comp["mean_diff"]
            out[f"{key}_t_p"] = comp["t_p"]
            out[f"{key}_significant"] = significant(comp)  # Holm-corrected for a primary measure
    return out


def console_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per arm for the terminal and the Prefect table artifact (means over seeds), with
    readable labels and units; success rates in % as in the report."""
    rows = []
    for model in MODELS:
        ppl = summary(results, "evaluate", model, "token_perplexity")
        row: dict[str, Any] = {
            "arm": model,
            "seeds": ppl["n"] if ppl else 0,
            "test perplexity": ppl["mean"] if ppl else None,
        }
        for attack, name in ATTACKS.items():
            if model in ARMS:
                damage = summary(results, attack, model, "abs_increase")
                success = summary(results, attack, model, "success_rate")
                row[f"{name} damage (nats/token)"] = damage["mean"] if damage else None
                rate = success["mean"] if success else None
                row[f"{name} success (%)"] = None if rate is None else 100 * rate
        rows.append(row)
    return rows
