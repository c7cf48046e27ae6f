"""What the attacks actually did, for the reader who wants to see it: each seed's universal
trigger per arm (text and token ids; two arms that converged to the same trigger explain two
identical transfer rows) and a few HotFlip examples of the first seed, the text before and after
with each flipped token marked ⟦…⟧ (the same texts for both arms). Their tables are
`example_tables.trigger_table` and `example_tables.hotflip_examples_table`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from monolm.report.labels import ARMS

_MARKDOWN_SPECIAL = "\\`*_[]<>#~"
UNIVERSAL = ("uat", "gcg")  # the attacks that learn one trigger per arm


def attack_examples(seeds: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """{"triggers": [{seed, attack, arm, text, ids}], "hotflip": [{seed, arm, index, before, after, flips,
    abs_increase, rel_increase}]} from the attack stages' manifests (HotFlip: the first seed only)."""
    triggers, hotflip = [], []
    for data in sorted(seeds, key=lambda d: int(d["seed"])):
        seed, stages = int(data["seed"]), data.get("stages", {})
        for attack in UNIVERSAL:
            metrics = (stages.get(attack) or {}).get("metrics") or {}
            for arm in ARMS:
                if arm in (metrics.get("triggers") or {}):
                    ids = (metrics.get("trigger_ids") or {}).get(arm)
                    text = metrics["triggers"][arm]
                    triggers.append({"seed": seed, "attack": attack, "arm": arm, "text": text, "ids": ids})
        examples = ((stages.get("hotflip") or {}).get("metrics") or {}).get("examples") or {}
        if examples and not hotflip:
            hotflip = [{"seed": seed, "arm": arm, **ex} for arm in ARMS for ex in examples.get(arm, [])]
    return {"triggers": triggers, "hotflip": hotflip}


def md_text(text: str) -> str:
    """Attacked text as one Markdown table cell: shown literally (no emphasis, no links), one line."""
    out = "".join(f"\\{ch}" if ch in _MARKDOWN_SPECIAL else ch for ch in text)
    return out.replace("\r", "").replace("\n", " ⏎ ").strip()
