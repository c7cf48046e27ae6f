"""The report's tables as plain data (a key, a title, columns, rows of strings and a note), built
once from results.json and shared by the Markdown and LaTeX renderers so the two can never
disagree."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from monolm.constraint.frozen import FROZEN_BOUND
from monolm.report.examples import md_text
from monolm.report.formatting import fmt_ci, fmt_mean_std, fmt_num, fmt_p, fmt_pct
from monolm.report.held_out import part_note, window_sentence
from monolm.report.labels import ARM_LABEL, ARMS, ATTACKS, MODELS, metric_label
from monolm.report.summaries import ALPHA, summary
from monolm.report.values import value
from monolm.report.verdicts import mde_clause


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


def quality_table(results: dict[str, Any]) -> Table | None:
    """Held-out perplexity, loss and bits per byte of every model."""
    n_seeds = len(results["meta"]["seeds"])
    quality = Table(
        "quality",
        f"Held-out quality on the test part (n = {n_seeds} seed{'s' if n_seeds != 1 else ''})",
        ["Model", "n", "Token perplexity (mean ± std)", "95% CI", "Loss (nats/token)", "Bits/byte"],
    )
    recs = []
    for model in MODELS:
        ppl = summary(results, "evaluate", model, "token_perplexity")
        if ppl is None:
            continue
        recs.append(ppl)
        quality.rows.append(
            [
                ARM_LABEL[model],
                str(ppl["n"]),
                fmt_mean_std(ppl),
                fmt_ci(ppl),
                fmt_mean_std(summary(results, "evaluate", model, "loss")),
                fmt_mean_std(summary(results, "evaluate", model, "bits_per_byte")),
            ]
        )
    if not quality.rows:
        return None
    facts = results.get("held_out")
    quality.note = " ".join(
        s
        for s in (
            part_note(facts, "test"),
            "Disjoint from the validation part that selected the checkpoints." if facts else "",
            window_sentence((facts or {}).get("window")),
            ci_note(recs),
        )
        if s
    )
    return quality


def _attack_row(results: dict[str, Any], attack: str, arm: str, prefix: str, rec: dict[str, Any]) -> list[str]:
    rel = summary(results, attack, arm, prefix + "rel_increase")
    succ = summary(results, attack, arm, prefix + "success_rate")
    n_texts = summary(results, attack, arm, prefix + "n_texts")
    return [
        str(rec["n"]),
        fmt_num(n_texts["mean"]) if n_texts else "—",
        fmt_mean_std(rec),
        fmt_ci(rec),
        fmt_mean_std(rel, pct=True),
        fmt_ci(rel, pct=True),
        fmt_mean_std(succ, pct=True),
    ]


def _attack_note(results: dict[str, Any], attack: str) -> str:
    """What the control and restart rows of an attack's table are, where it has them."""
    note = ""
    if any(summary(results, attack, arm, "control_abs_increase") for arm in ARMS):
        note += (
            " The random control is the same search with random (query-only) candidates instead of "
            "gradient-ranked ones, at the same number of scored candidates."
        )
    if any(summary(results, attack, arm, "restart_mean_abs_increase") for arm in ARMS):
        note += (
            " Universal triggers: the first row per arm is the best of the restarts (the attacker's view, chosen on "
            "the optimisation texts), 'mean over restarts' scores every restart's trigger on every held-out text and "
            "averages per text; the paired arm test on it (restart_mean_abs_increase) is over these per-text means, "
            "so it carries both the text and the restart variance."
        )
    return note


def attack_table(results: dict[str, Any], attack: str) -> Table | None:
    """One attack's effect per arm (absolute first), then its random control where it has one."""
    name = ATTACKS[attack]
    threshold = results["meta"].get("success_threshold")
    t = Table(
        f"attack-{attack}",
        f"{name}: effect on the original text tokens (absolute first)",
        [
            "Model",
            "n seeds",
            "n texts",
            "Δ loss, nats/token (mean ± std)",
            "95% CI",
            "Relative increase",
            "95% CI",
            f"Success rate (rel. > {fmt_pct(threshold)})",
        ],
    )
    recs = []
    for prefix, suffix in (("", ""), ("restart_mean_", " — mean over restarts"), ("control_", " — random control")):
        for arm in ARMS:
            rec = summary(results, attack, arm, prefix + "abs_increase")
            if rec is None:
                continue
            recs.append(rec)
            t.rows.append([ARM_LABEL[arm] + suffix, *_attack_row(results, attack, arm, prefix, rec)])
    if not t.rows:
        return None
    t.note = ci_note(recs) + _attack_note(results, attack)
    if results.get("held_out"):
        t.note += " Texts from the attack part, disjoint from the validation and test parts."
    return t


def _test_row(c: dict[str, Any]) -> list[str]:
    scope = "across seeds" if c["scope"] == "seeds" else f"seed {c['seed']}, over {c['scope']}"
    metric = (
        f"HotFlip gradient − control ({c['metric'].removeprefix('gradient_vs_control_')})"
        if c["metric"].startswith("gradient_vs_control_")
        else metric_label(c["stage"], c["metric"])
    )
    verdict = "significant" if c["significant"] else f"not significant{mde_clause(c)}"
    if c.get("role") == "primary":
        holm = "significant" if c.get("significant_holm") else "not significant"
        verdict = f"primary: {holm} (Holm p={fmt_p(c.get('p_holm'))})"
    elif c.get("role") == "damage" and c.get("p_holm") is not None:  # its own family (damage_arm)
        holm = "significant" if c.get("significant_holm") else "not significant"
        verdict = f"vs damage-matched: {holm} (Holm p={fmt_p(c['p_holm'])})"
    elif c.get("role") in ("secondary", "supporting"):
        verdict = f"{c['role']}, uncorrected: {verdict}"
    ci = f"[{fmt_num(c['ci_low'])}, {fmt_num(c['ci_high'])}]" if c["ci_low"] is not None else "—"
    return [
        metric,
        scope,
        str(c["n"]),
        fmt_num(c["mean_diff"], sign=True),
        ci,
        fmt_p(c["t_p"]),
        fmt_p(c["wilcoxon_p"]),
        verdict,
    ]


def tests_table(results: dict[str, Any]) -> Table | None:
    """Every paired test: difference, its CI, both p-values and the verdict."""
    tests = Table(
        "tests",
        "Paired tests, monotonic − baseline (primary: paired t-test; also Wilcoxon signed-rank)",
        ["Metric", "Scope", "n", "Difference", "95% CI", "t-test p", "Wilcoxon p", "Verdict"],
    )
    tests.rows = [_test_row(c) for c in results["comparisons"]]
    if not tests.rows:
        return None
    tests.note = (
        f"α = {ALPHA}. Primary tests (test loss, each attack's absolute loss increase) are Holm-corrected over "
        "the report's primary family; secondary and supporting tests are shown uncorrected and give no verdict."
    ) + wilcoxon_floor_note(results["comparisons"])
    return tests


def wilcoxon_floor_note(comparisons: Iterable[dict[str, Any]]) -> str:
    """For tests across so few seeds that the exact two-sided Wilcoxon p-value cannot reach α
    (its smallest value is 2 / 2^n): say so, with the actual n. Nothing otherwise."""
    notes = []
    for n in sorted({c["n"] for c in comparisons if c["scope"] == "seeds" and c.get("wilcoxon_p") is not None}):
        floor = 2.0 / 2**n
        if floor > ALPHA:
            notes.append(
                f" With n = {n} seeds the exact two-sided Wilcoxon p-value cannot be below {fmt_p(floor)}, so "
                f"the Wilcoxon test cannot reach α = {ALPHA} across seeds."
            )
    return "".join(notes)


def transfer_table(results: dict[str, Any], attack: str) -> Table | None:
    """Damage of the attack crafted on one arm (row) to each arm (column)."""
    sources = sorted(
        {
            r["metric"].removeprefix("transfer_from_")
            for r in results["summaries"]
            if r["stage"] == attack and r["metric"].startswith("transfer_from_")
        }
    )
    if not sources:
        return None
    t = Table(
        f"transfer-{attack}",
        f"{ATTACKS[attack]} transfer: Δ loss (nats/token) on the target model, mean over seeds",
        ["Crafted on (row) / evaluated on (column)", *ARMS, "n"],
    )
    for source in sources:
        recs = [summary(results, attack, target, f"transfer_from_{source}") for target in ARMS]
        t.rows.append([source, *(fmt_mean_std(r) for r in recs), str(max((r["n"] for r in recs if r), default=0))])
    return t


def trigger_table(results: dict[str, Any]) -> Table | None:
    rows = (results.get("examples") or {}).get("triggers") or []
    if not rows:
        return None
    t = Table(
        "triggers",
        "Universal triggers (UAT, GCG): the best trigger found for each arm",
        ["Attack", "Seed", "Arm", "Trigger (text)", "Token ids"],
        markdown_only=True,
        left=5,
    )
    for r in rows:
        ids = " ".join(str(i) for i in r["ids"]) if r.get("ids") is not None else "—"
        attack = r.get("attack", "uat")
        t.rows.append([ATTACKS.get(attack, attack), str(r["seed"]), ARM_LABEL[r["arm"]], md_text(r["text"]), ids])
    groups = sorted({(r["seed"], r.get("attack", "uat")) for r in rows})
    same = [
        f"{seed} ({ATTACKS.get(attack, attack)})"
        for seed, attack in groups
        if len([r for r in rows if (r["seed"], r.get("attack", "uat")) == (seed, attack)]) > 1
        and len({tuple(r["ids"] or ()) for r in rows if (r["seed"], r.get("attack", "uat")) == (seed, attack)}) == 1
    ]
    t.note = "The trigger is prepended to every held-out text; the effects above are on the text tokens only." + (
        f" Both arms converged to the same trigger in seed(s) {', '.join(map(str, same))}, so their transfer "
        "rows are the same attack."
        if same
        else ""
    )
    return t


def hotflip_examples_table(results: dict[str, Any]) -> Table | None:
    rows = (results.get("examples") or {}).get("hotflip") or []
    if not rows:
        return None
    n_texts, seed = len({r["index"] for r in rows}), rows[0]["seed"]
    t = Table(
        "hotflip-examples",
        f"HotFlip: the first {n_texts} attacked texts of seed {seed}, before and after",
        ["Arm", "Text", "Before", "After (flipped tokens ⟦marked⟧)", "Flips", "Δ loss (nats/token)", "Relative"],
        markdown_only=True,
        left=4,
    )
    for r in sorted(rows, key=lambda r: (r["index"], ARMS.index(r["arm"]))):
        t.rows.append(
            [
                ARM_LABEL[r["arm"]],
                str(r["index"]),
                md_text(r["before"]),
                md_text(r["after"]),
                str(r["flips"]),
                fmt_num(r["abs_increase"], sign=True),
                fmt_pct(r["rel_increase"]),
            ]
        )
    t.note = "⟦…⟧ marks a flipped token (before: the original token; after: the one put there); ⏎ a line break."
    return t


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
