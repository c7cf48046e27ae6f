"""Memory plans and workloads of the GPU stages, from the experiment's config.

Two users: the stages (train, evaluate, attack), which call `plan_*_stage` before their first
step and record the plan in their manifest, and `monolm plan`, which prints for every GPU stage
the estimate on the cards a cluster user plans for (`memory.CARDS`), the batch the plan chooses
and the stage's token and FLOP count, so walltimes (`runner.stage_timeout_minutes`, the SLURM
walltime) can be set from it. The model's shape comes from `monolm.models.shape`: its saved config
(stages) or, before stage 0 has run, `model_shape` (every `model.source`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monolm.config import ArmConfig, ExperimentConfig
from monolm.config.controls import climbs
from monolm.memory import estimates as memory
from monolm.memory.estimates import MemoryPlan, ModelShape
from monolm.models.shape import model_shape, shape_of_dir
from monolm.study import registry

log = logging.getLogger("monolm.planning")

# The Pile holds about 300B tokens in about 211M documents (GPT-NeoX tokenizer).
DEFAULT_TOKENS_PER_DOC = 1400
# bf16 dense matmul peak of an A100, for the walltime column of `monolm plan`.
A100_BF16_FLOPS = 312e12
PLAN_MFU = 0.35


# --------------------------------------------------------------------------- the stages' plans
def plan_train_stage(
    cfg: ExperimentConfig, arm: str, recipe: ArmConfig, model_dir: Path, device, *, capacity: int | None = None
) -> tuple[ArmConfig, MemoryPlan]:
    """The recipe with the micro-batch and accumulation the plan chose (same effective batch),
    and the plan. Raises memory.MemoryPlanError when micro-batch 1 does not fit."""
    shape = shape_of_dir(model_dir, cfg.model.slug)
    return _plan_train(cfg, arm, recipe, shape, device, capacity)


def _plan_train(cfg, arm, recipe, shape, device, capacity, description: str | None = None):
    import torch

    from monolm.core.runtime import resolve_flag

    device = torch.device(device)
    if description is None:
        measured, description = memory.device_capacity(device)
        capacity = measured if capacity is None else capacity
    constrained = shape.constrained_parameters(cfg.constraint.variant) if arm == "monotonic" else 0
    plan = memory.plan_training(
        shape,
        stage=f"train_{arm}",
        micro_batch=recipe.micro_batch_size,
        grad_accum=recipe.grad_accum_steps,
        seq_len=cfg.data.seq_len,
        bf16=resolve_flag(recipe.bf16, device),
        checkpointing=resolve_flag(recipe.gradient_checkpointing, device),
        constrained_parameters=constrained,
        capacity=capacity,
        device=description,
        foreach_optimizer=device.type == "cuda",
    )
    planned = recipe.model_copy(update={"micro_batch_size": plan.chosen, "grad_accum_steps": plan.grad_accum_chosen})
    _log(plan)
    return planned, plan


def plan_eval_stage(
    cfg: ExperimentConfig, model_dir: Path, device, *, capacity: int | None = None, name: str = "evaluate"
) -> MemoryPlan:
    """The evaluation batch size that fits (one model resident at a time); `name`: the stage, as
    the plan names it."""
    return _plan_eval(cfg, shape_of_dir(model_dir, cfg.model.slug), device, capacity, stage=name)


def _plan_eval(
    cfg, shape, device, capacity, description: str | None = None, stage: str = "evaluate", resident: int = 1
):
    import torch

    from monolm.core.runtime import bf16_enabled

    device = torch.device(device)
    if description is None:
        measured, description = memory.device_capacity(device)
        capacity = measured if capacity is None else capacity
    bf16 = bf16_enabled(cfg.evaluation.bf16, device, cuda_only=True) if device.type == "cuda" else False

    def estimate(batch: int) -> dict[str, int]:
        return memory.inference_bytes(shape, batch=batch, seq_len=cfg.eval_seq_len, bf16=bf16, resident_models=resident)

    plan = memory.plan_batch(
        shape,
        stage=stage,
        setting="evaluation.batch_size",
        requested=cfg.evaluation.batch_size,
        estimate=estimate,
        capacity=capacity,
        device=description,
    )
    _log(plan)
    return plan


def attack_lengths(cfg: ExperimentConfig, stage: str) -> tuple[int, int, int]:
    """(tokens per attacked sequence, target positions per sequence, rows per gradient pass), as
    the attack declares them (`registry.AttackSpec`); an attack the registry does not know is a
    ValueError, never another attack's lengths."""
    return registry.attack_spec(stage).lengths(cfg)


def plan_attack_stage(
    cfg: ExperimentConfig, stage: str, model_dir: Path, device, *, capacity: int | None = None, name: str | None = None
):
    """(the attack's settings with the candidate batch the plan chose, the plan): both arms are
    resident while one is attacked. `stage`: the attack; `name`: the stage, as the plan names it."""
    plan = _plan_attack(cfg, stage, shape_of_dir(model_dir, cfg.model.slug), device, capacity, name=name)
    section = getattr(cfg.attacks, stage)
    return section.model_copy(update={"score_batch_size": plan.chosen}), plan


def _plan_attack(cfg, stage, shape, device, capacity, description: str | None = None, name: str | None = None):
    import torch

    from monolm.core.runtime import bf16_enabled

    device = torch.device(device)
    if description is None:
        measured, description = memory.device_capacity(device)
        capacity = measured if capacity is None else capacity
    bf16 = bf16_enabled(cfg.attacks.bf16, device, cuda_only=True) if device.type == "cuda" else False
    seq, targets, grad_rows = attack_lengths(cfg, stage)
    grad = memory.gradient_pass_bytes(shape, batch=grad_rows, seq_len=seq, bf16=bf16, resident_models=2)
    extra = 4 * shape.constrained_parameters(cfg.constraint.variant)  # the cached W while attacking

    def estimate(rows: int) -> dict[str, int]:
        score = memory.inference_bytes(
            shape, batch=rows, seq_len=seq, bf16=bf16, resident_models=2, logit_positions=targets, weight_cache=False
        )
        scoring, gradient = score["peak"] - score["weights"], grad["peak"] - grad["weights"]
        parts = {"weights": score["weights"], "constrained_w": extra, "scoring": scoring, "gradient_pass": gradient}
        return {**parts, "peak": score["weights"] + extra + max(scoring, gradient)}

    plan = memory.plan_batch(
        shape,
        stage=name or stage,
        setting=f"attacks.{stage}.score_batch_size",
        requested=getattr(cfg.attacks, stage).score_batch_size,
        estimate=estimate,
        capacity=capacity,
        device=description,
    )
    _log(plan)
    return plan


def _log(plan: MemoryPlan) -> None:
    (log.warning if plan.changed else log.info)("%s", plan.describe())


# --------------------------------------------------------------------------- workloads (monolm plan)
@dataclass
class Workload:
    tokens: float  # tokens through the model (forward; training counts forward+backward tokens once)
    flops: float  # model FLOPs


def _held_out_docs(cfg: ExperimentConfig, field: str) -> int:
    """Documents of a held-out part (`n_val_docs`/`n_test_docs`; one `n_eval_docs` for both in
    configs that have a single evaluation part)."""
    return getattr(cfg.data, field, None) or cfg.data.n_eval_docs


def train_workload(cfg: ExperimentConfig, arm: str, shape: ModelShape, tokens_per_doc: int) -> Workload:
    from monolm.training.schedule import total_steps_for

    recipe = cfg.training.arm(arm)
    seq = cfg.data.seq_len
    n_blocks = max(1, cfg.data.n_train_docs * tokens_per_doc // seq)
    steps = total_steps_for(recipe, n_blocks)
    train_tokens = steps * recipe.effective_batch_size * seq
    evals = math.ceil(steps / recipe.eval_every_steps)
    val_tokens = evals * min(recipe.eval_max_docs, _held_out_docs(cfg, "n_val_docs")) * tokens_per_doc
    flops = train_tokens * shape.train_flops_per_token(seq) + val_tokens * shape.forward_flops_per_token(seq)
    return Workload(train_tokens + val_tokens, flops)


def eval_workload(cfg: ExperimentConfig, shape: ModelShape, tokens_per_doc: int) -> Workload:
    tokens = 3 * min(cfg.evaluation.max_docs, _held_out_docs(cfg, "n_test_docs")) * tokens_per_doc
    return Workload(tokens, tokens * shape.forward_flops_per_token(cfg.eval_seq_len))


def constrain_workload(cfg: ExperimentConfig, shape: ModelShape, tokens_per_doc: int) -> Workload:
    tokens = 2 * cfg.constraint.drift_docs * min(tokens_per_doc, cfg.data.seq_len)
    return Workload(tokens, tokens * shape.forward_flops_per_token(cfg.data.seq_len))


DAMAGE_ATTACKS = ("uat", "hotflip", "gcg")  # the attacks of `monolm.controls.attack_runners.RUNNERS`


def damage_workload(cfg: ExperimentConfig, shape: ModelShape, tokens_per_doc: int) -> Workload:
    """The damage-matched arm at most: the constrained arm's and every bisection step's validation
    pass, one test pass, and each attack on one model (about half an attack stage, random
    controls included although the damage arm runs none: an upper bound)."""
    if not cfg.controls.damage.enabled:
        return Workload(0, 0)
    recipe = cfg.training.arm("monotonic")
    val = (cfg.controls.damage.max_steps + 1) * min(recipe.eval_max_docs, _held_out_docs(cfg, "n_val_docs"))
    tokens = (val + min(cfg.evaluation.max_docs, _held_out_docs(cfg, "n_test_docs"))) * tokens_per_doc
    flops = tokens * shape.forward_flops_per_token(cfg.data.seq_len)
    attacks = [attack_workload(cfg, stage, shape) for stage in DAMAGE_ATTACKS]
    return Workload(tokens + sum(a.tokens for a in attacks) / 2, flops + sum(a.flops for a in attacks) / 2)


def attack_workload(cfg: ExperimentConfig, stage: str, shape: ModelShape) -> Workload:
    """Both arms attacked, plus the 2x2 transfer matrix. A gradient pass counts as 3 forwards."""
    attack = registry.attack_spec(stage)
    seq, _, _ = attack.lengths(cfg)
    sequences = 2 * attack.search_sequences(attack.section(cfg)) + 4 * 2 * attack.n_eval_texts(cfg)
    tokens = sequences * seq
    return Workload(tokens, tokens * shape.forward_flops_per_token(seq))


def planned_stages() -> tuple[str, ...]:
    """The GPU stages `monolm plan` lists, from the registry: each GPU stage that is not a
    baseline's share (a share runs the same code on the same model as its cell stage)."""
    return tuple(s.name for s in registry.seed_stages() if s.gpu and s.share_of is None)


def ladder_workload(cfg: ExperimentConfig, shape: ModelShape, tokens_per_doc: int) -> Workload:
    """The quality ladder (`monolm.controls.ladder`): each rung and the base model evaluated on the
    test part and attacked once with UAT, HotFlip and GCG (no transfer, no random control)."""
    u, f = cfg.attacks.uat, cfg.attacks.hotflip
    gcg_search = registry.attack_spec("gcg").search_sequences
    work = [
        (min(cfg.evaluation.max_docs, _held_out_docs(cfg, "n_test_docs")) * tokens_per_doc, cfg.eval_seq_len),
        ((u.restarts * u.max_sweeps * u.trigger_len * u.n_opt_texts * (u.top_k + 4) + 2 * u.n_eval_texts), "uat"),
        (f.n_texts * f.max_flips * (f.top_b + 4), "hotflip"),
        (gcg_search(cfg.attacks.gcg.model_copy(update={"random_control": False})), "gcg"),
    ]
    tokens = flops = 0.0
    for amount, where in work:
        seq = attack_lengths(cfg, where)[0] if isinstance(where, str) else where
        n = amount * seq if isinstance(where, str) else amount
        tokens, flops = tokens + n, flops + n * shape.forward_flops_per_token(seq)
    models = len(cfg.controls.ladder.rungs) + 1  # the rungs and the base model
    return Workload(models * tokens, models * flops)


def plan_table(
    cfg: ExperimentConfig, cards: dict[str, int] | None = None, tokens_per_doc: int = DEFAULT_TOKENS_PER_DOC
) -> tuple[ModelShape, list[dict[str, Any]]]:
    """One row per GPU stage: per card the chosen batch and the estimate (or why it does not fit),
    the stage's tokens and model FLOPs, and hours on one A100 at `PLAN_MFU`."""
    cards = cards or memory.CARDS
    shape = model_shape(cfg)
    rows = []
    for stage in planned_stages():
        if stage == "ladder" and not climbs(cfg.controls.ladder, cfg.model.source):
            continue
        row: dict[str, Any] = {"stage": stage}
        for card, total in cards.items():
            capacity = memory.usable_bytes(total, total)
            try:
                plan = _card_plan(cfg, stage, shape, capacity, card)
                row[card] = plan
            except memory.MemoryPlanError as exc:
                row[card] = exc
        work = _workload(cfg, stage, shape, tokens_per_doc)
        row.update(tokens=work.tokens, flops=work.flops, a100_hours=work.flops / (A100_BF16_FLOPS * PLAN_MFU) / 3600)
        rows.append(row)
    return shape, rows


def _card_plan(cfg, stage, shape, capacity, card) -> MemoryPlan:
    device, kind = "cuda", registry.stage(stage).kind
    if kind == "train":
        arm = stage.removeprefix("train_")
        return _plan_train(cfg, arm, cfg.training.arm(arm), shape, device, capacity, card)[1]
    if kind == "attack":
        return _plan_attack(cfg, stage, shape, device, capacity, card)
    if stage == "ladder":  # one rung at a time, attacked like an arm: UAT's plan is the larger
        return _plan_attack(cfg, "uat", shape, device, capacity, card)
    if kind == "constrain" or stage == "damage":  # the model plus its matrices' originals (and noise)
        return _plan_eval(cfg, shape, device, capacity, card, stage=stage, resident=2)
    if kind == "evaluate":
        return _plan_eval(cfg, shape, device, capacity, card)
    raise ValueError(f"no memory plan for stage {stage!r} of kind {kind!r}")


def _workload(cfg, stage, shape, tokens_per_doc) -> Workload:
    kind = registry.stage(stage).kind
    if kind == "train":
        return train_workload(cfg, stage.removeprefix("train_"), shape, tokens_per_doc)
    if kind == "attack":
        return attack_workload(cfg, stage, shape)
    if stage == "ladder":
        return ladder_workload(cfg, shape, tokens_per_doc)
    if kind == "constrain":
        return constrain_workload(cfg, shape, tokens_per_doc)
    if stage == "damage":
        return damage_workload(cfg, shape, tokens_per_doc)
    if kind == "evaluate":
        return eval_workload(cfg, shape, tokens_per_doc)
    raise ValueError(f"no workload for stage {stage!r} of kind {kind!r}")
