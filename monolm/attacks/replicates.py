"""Restarts are the replicates of a universal trigger.

Which trigger a restart finds is random; the best of `k` restarts is what an attacker with `k`
tries gets, the mean over restarts is what one try gets on average. Both are reported, each on
the held-out evaluation texts: every restart's trigger is scored on every text, and the mean
over restarts is taken per text (so a paired test between the arms over texts sees both the
text and the restart variance: a text's value is already the mean over that arm's restarts).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from monolm.attacks.effects import effect_summary
from monolm.attacks.scoring import AttackSetup, TextBatch
from monolm.attacks.trigger_search import trigger_row, with_triggers


def restart_effects(
    setup: AttackSetup,
    triggers: Sequence[Sequence[int]],
    texts: TextBatch,
    clean: Sequence[float],
    *,
    threshold: float,
    seed: int,
) -> dict[str, Any]:
    """Per restart the attacked loss of every text and its effect summary, and the per-text mean
    over restarts with its summary (`mean_over_restarts`)."""
    per_restart = []
    for trig in triggers:
        attacked = setup.losses(with_triggers(setup.prefix, trigger_row(trig), texts)).tolist()
        per_restart.append(
            {"attacked": attacked, "eval": effect_summary(clean, attacked, threshold=threshold, seed=seed)}
        )
    n = len(clean)
    mean_attacked = [sum(r["attacked"][i] for r in per_restart) / len(per_restart) for i in range(n)]
    return {
        "per_restart": per_restart,
        "mean_over_restarts": {
            "attacked": mean_attacked,
            "eval": effect_summary(clean, mean_attacked, threshold=threshold, seed=seed),
        },
    }
