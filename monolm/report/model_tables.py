"""The tables about the models themselves: measured monotonicity of the constrained sublayers, what
constraining did to the weights, how both arms were trained, and every seed's headline numbers."""

from __future__ import annotations

from typing import Any

from monolm.constraint.frozen import FROZEN_BOUND
from monolm.report.formatting import fmt_mean_std, fmt_num
from monolm.report.held_out import part_note
from monolm.report.labels import ARM_LABEL, ARMS, ATTACKS
from monolm.report.summaries import summary
from monolm.report.table_base import Table
from monolm.report.values import value


def monotonicity_table(results: dict[str, Any]) -> Table | None:
    """Measured violation rates of the constrained sublayers, after constraining and after training."""
    mono = [
        r
        for r in results["summaries"]
        if r["metric"].startswith("monotonicity_") and r["metric"].endswith("_coord_violation_rate")
    ]
    if not mono:
        return None
    t = Table(
        "monotonicity",
        "Empirical monotonicity violations of the constrained sublayers "
        "(share of output coordinates that decreased when the input increased)",
        ["When", "Sublayer", "n seeds", "Coordinate rate", "Pair rate", "Max relative drop"],
    )
    for r in mono:
        base = r["metric"].removesuffix("_coord_violation_rate")
        when = "after training" if r["stage"] == "evaluate" else "after constraining"
        pair = summary(results, r["stage"], r["model"], base + "_pair_violation_rate")
        drop = summary(results, r["stage"], r["model"], base + "_max_relative_drop")
        t.rows.append(
            [
                when,
                base.removeprefix("monotonicity_").replace("_", " "),
                str(r["n"]),
                fmt_mean_std(r, pct=True),
                fmt_mean_std(pair, pct=True),
                fmt_mean_std(drop),
            ]
        )
    t.note = (
        "'linear' is the constrained Linear alone (0 by construction with non-negative weights); 'block' is the "
        "enclosing FFN/attention block as the model computes it. A rate above 0 shows the sublayer is not "
        "monotone; a rate of 0 means no violation among the sampled pairs, not a proof of monotonicity."
    )
    return t


CONSTRAINT_ROWS = (
    ("share_of_params", "share of parameters constrained"),
    ("frac_negative_before", "fraction of constrained weights negative before"),
    ("rel_change", "relative change of the constrained weights"),
    ("drift_kl_mean", "KL(base ‖ constrained) per token, nats"),
    ("drift_ppl_ratio", "perplexity ratio constrained/base"),
    ("min_constrained_weight", "minimum constrained weight"),
)


def constraint_table(results: dict[str, Any]) -> Table | None:
    """What stage 1 did to the weights and the function, and the smallest weight after training."""
    cons = Table(
        "constraint", "What constraining did (stage 1, before training)", ["Quantity", "n seeds", "Mean ± std"]
    )
    for metric, label in CONSTRAINT_ROWS:
        rec = summary(results, "constrain", "monotonic", metric)
        if rec:
            cons.rows.append([label, str(rec["n"]), fmt_mean_std(rec)])
    rec = summary(results, "evaluate", "monotonic", "min_constrained_weight")
    if rec:
        cons.rows.append(["minimum constrained weight after training", str(rec["n"]), fmt_mean_std(rec)])
    for stage, metric, when in FROZEN_ROWS:
        rec = summary(results, stage, "monotonic", metric)
        if rec:
            label = f"share of constrained weights effectively frozen (dW/dV < {FROZEN_BOUND:g}), {when}"
            cons.rows.append([label, str(rec["n"]), fmt_mean_std(rec, pct=True)])
    return cons if cons.rows else None


FROZEN_ROWS = (
    ("constrain", "frozen_share", "after stage 1"),
    ("train_monotonic", "frozen_share_start", "at the start of training"),
    ("train_monotonic", "frozen_share_end", "at the end of training"),
)


def training_table(results: dict[str, Any]) -> Table | None:
    """How both arms were trained: steps, tokens, lr, final and best validation perplexity, time."""
    train = Table(
        "training",
        "Training of both arms",
        [
            "Arm",
            "n seeds",
            "Steps",
            "Tokens seen",
            "lr",
            "Final val. perplexity",
            "Best val. perplexity",
            "Wall time (s)",
        ],
    )
    train.note = part_note(results.get("held_out"), "validation") + (
        " Validation perplexity is measured on the validation part, which selected best/; it is disjoint from the "
        "test part of the quality table."
        if results.get("held_out")
        else ""
    )
    for arm in ARMS:
        stage = f"train_{arm}"
        steps = summary(results, stage, arm, "steps")
        if steps is None:
            continue
        train.rows.append(
            [
                ARM_LABEL[arm],
                str(steps["n"]),
                fmt_mean_std(steps),
                *(
                    # the learning rate is a setting: shown as configured (5e-04), not as a measurement
                    fmt_mean_std(summary(results, stage, arm, metric), setting=metric == "lr")
                    for metric in (
                        "tokens_seen",
                        "lr",
                        "final_val_perplexity",
                        "final_best_val_perplexity",
                        "wall_time_s",
                    )
                ),
            ]
        )
    return train if train.rows else None


# (stage, metric, column title) of the per-seed table; each column is shown for every arm.
def per_seed_columns() -> tuple[tuple[str, str, str], ...]:
    return (
        ("evaluate", "token_perplexity", "PPL"),
        *((attack, "abs_increase", f"{label} Δ") for attack, label in ATTACKS.items()),
    )


def per_seed_table(results: dict[str, Any]) -> Table:
    """The headline numbers of every seed, so a reader can see whether one seed drives a mean."""
    titles = [f"{title} {arm}" for _, _, title in per_seed_columns() for arm in ARMS]
    per_seed = Table("per-seed", "Per-seed values", ["Seed", *titles])
    for seed in results["meta"]["seeds"]:
        per_seed.rows.append(
            [
                str(seed),
                *(
                    fmt_num(value(results, seed, stage, arm, metric))
                    for stage, metric, _ in per_seed_columns()
                    for arm in ARMS
                ),
            ]
        )
    per_seed.note = "Δ: absolute loss increase in nats/token on the attacked texts."
    return per_seed
