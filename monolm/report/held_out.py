"""Which held-out part every number comes from, and what the report says about the parts.

Each seed has three held-out parts besides train, pairwise disjoint and checked for
near-duplicates of train in stage 0: validation (checkpoint selection, the training curves, stage
1's function drift), test (stage 4's quality) and attack (stages 5-6). results.json tags every
value, summary and comparison with its `part`, and carries the per-seed facts under `held_out`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from monolm.report.formatting import fmt_pct
from monolm.report.labels import ATTACKS

PART_USE = {
    "validation": "checkpoint selection and training curves",
    "test": "reported quality",
    "attack": "attacks",
}


def data_part(stage: str, metric: str) -> str | None:
    """The data part a number was measured on: train, validation, test or attack (None for a
    number that is not measured on text, e.g. a wall time or a learning rate)."""
    if metric in ("wall_time_s", "min_constrained_weight"):
        return None
    if stage in ATTACKS:
        return "attack"
    if stage == "evaluate":
        return "test"
    if stage == "constrain":
        return "validation" if metric.startswith(("drift_", "monotonicity_")) else None
    if stage.startswith("train_"):
        if "val_" in metric:
            return "validation"
        if metric in ("final_train_loss", "tokens_seen", "steps"):
            return "train"
    return None


def tag_parts(records: Sequence[dict[str, Any]]) -> None:
    """Add `part` to each value, summary or comparison record (in place)."""
    for rec in records:
        rec["part"] = data_part(rec["stage"], rec["metric"])


def held_out_facts(seeds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per seed: documents per part and what stage 0's contamination check measured (from its
    manifest), the validation documents each arm's selection used, and stage 4's window."""
    facts: dict[str, Any] = {"use": PART_USE, "seeds": {}, "window": None}
    for data in seeds:
        stages = data.get("stages", {})
        setup = (stages.get("setup") or {}).get("metrics", {})
        entry: dict[str, Any] = {"docs": setup.get("docs"), "contamination": setup.get("contamination")}
        train = (stages.get("train_baseline") or {}).get("metrics", {})
        if "validation_docs" in train:
            entry["validation_docs_used"] = train["validation_docs"]
        evaluation = data.get("evaluation") or {}
        if evaluation.get("part"):
            entry["test_docs_used"] = evaluation.get("n_docs")
            facts["window"] = facts["window"] or evaluation.get("window")
        facts["seeds"][str(data["seed"])] = entry
    return facts


def window_sentence(window: dict[str, Any] | None) -> str:
    """How stage 4's perplexity was computed, in words a reader can reproduce with lm-eval."""
    if not window:
        return ""
    n = window["seq_len"]
    prefix = "EOS" if window.get("prefix") == "eos" else str(window.get("prefix"))
    return (
        f"Perplexity over rolling windows of {n} tokens with disjoint predicted spans, {prefix} prefix; equal to "
        f"lm-eval `loglikelihood_rolling` with `max_length={n}`."
    )


def _docs(facts: dict[str, Any], part: str) -> str:
    counts = sorted({e["docs"][part] for e in facts["seeds"].values() if (e.get("docs") or {}).get(part) is not None})
    if not counts:
        return "?"
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"


def part_note(facts: dict[str, Any] | None, part: str) -> str:
    """'Test part: 40 documents per seed.'-style words for a table's note ('' without facts)."""
    if not facts or not facts.get("seeds"):
        return ""
    return f"{part.capitalize()} part: {_docs(facts, part)} documents per seed ({PART_USE[part]})."


def _dropped(facts: dict[str, Any]) -> str:
    """Contaminated candidates per part, summed over seeds."""
    totals: dict[str, list[int]] = {}
    ngram = action = None
    for entry in facts["seeds"].values():
        check = entry.get("contamination") or {}
        ngram, action = check.get("ngram", ngram), check.get("action", action)
        for part, rec in (check.get("parts") or {}).items():
            total = totals.setdefault(part, [0, 0])
            total[0] += rec["contaminated"]
            total[1] += rec["candidates"]
    if not totals:
        return ""
    n_seeds = len(facts["seeds"])
    parts = "; ".join(
        f"{part} {bad} of {cands} ({fmt_pct(bad / cands if cands else 0.0)})" for part, (bad, cands) in totals.items()
    )
    verb = "dropped" if action == "drop" else "found"
    return (
        f" Stage 0's contamination check ({ngram}-gram and exact-paragraph overlap with train and the parts "
        f"before) {verb} candidates{' over ' + str(n_seeds) + ' seeds' if n_seeds > 1 else ''}: {parts}."
    )


def held_out_statement(facts: dict[str, Any] | None) -> str:
    """The report's line on the held-out data: parts, sizes, uses, and the contamination counts."""
    if not facts or not facts.get("seeds"):
        return ""
    parts = ", ".join(f"{part} {_docs(facts, part)} ({use})" for part, use in PART_USE.items())
    return (
        f"Held-out data per seed, pairwise disjoint and disjoint from train: {parts} documents."
        + _dropped(facts)
        + " Checkpoints were selected on validation only; quality is reported on test."
    )
