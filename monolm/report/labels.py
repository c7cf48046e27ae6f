"""The names stage 7 reports on and how they read in words: the arms, the models, the attack
stages and the metrics. The report and the figures both take them from here, so a table and a
figure can never call the same thing by two names."""

from __future__ import annotations

from monolm.study.registry import ATTACKS  # attack stage -> its name in the report

ARMS = ("baseline", "monotonic")  # the two trained arms; differences are always monotonic − baseline
MODELS = ("base", "baseline", "monotonic")  # the arms plus the pre-trained model they start from
ARM_LABEL = {"base": "base (pre-trained)", "baseline": "baseline", "monotonic": "monotonic (non-negative FFN weights)"}
METRIC_LABEL = {
    "token_perplexity": "held-out token perplexity",
    "loss": "held-out loss (nats/token)",
    "bits_per_byte": "bits per byte",
    "abs_increase": "absolute loss increase (nats/token)",
    "rel_increase": "relative loss increase",
    "success_rate": "success rate",
    "control_abs_increase": "random-control absolute loss increase (nats/token)",
    "doc_loss": "per-document loss (nats/token)",
    "vs_damage_loss": "test loss, constrained − damage-matched (nats/token)",
    "vs_damage_doc_loss": "per-document loss, constrained − damage-matched (nats/token)",
    "vs_damage_abs_increase": "absolute loss increase, constrained − damage-matched (nats/token)",
}
LOWER_IS_BETTER = {"token_perplexity", "loss", "bits_per_byte"}  # quality metrics
ATTACK_METRICS = ("abs_increase", "rel_increase", "success_rate")  # reported for every attack


def metric_label(stage: str, metric: str) -> str:
    """A metric in words, prefixed by the attack's name for an attack stage ("UAT success rate")."""
    name = ATTACKS.get(stage, "")
    return f"{name} {METRIC_LABEL.get(metric, metric)}".strip()
