"""The report's example tables (report.md only, not the paper's tables.tex): the universal triggers
the attacks found and a few HotFlip texts before and after, as the attacks left them."""

from __future__ import annotations

from typing import Any

from monolm.report.examples import md_text
from monolm.report.formatting import fmt_num, fmt_pct
from monolm.report.labels import ARM_LABEL, ARMS, ATTACKS
from monolm.report.table_base import Table


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
