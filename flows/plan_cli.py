"""`monolm plan`: per GPU stage, the memory estimate and chosen batch on each card, tokens and
model FLOPs, then the minimum detectable effect of each headline test."""

from __future__ import annotations

import argparse
import logging

from flows.cli_config import add_config_args, config_from_args
from monolm.config import ExperimentConfig


def add_plan_parser(sub: argparse._SubParsersAction) -> None:
    """`monolm plan`: the config options, the documents' mean length and an effect to size for."""
    plan = sub.add_parser("plan", help="memory plan and token/FLOP count of every GPU stage on A100-40GB/80GB")
    add_config_args(plan)
    plan.add_argument("--tokens-per-doc", type=int, default=1400, help="mean document length in tokens (the Pile's)")
    plan.add_argument(
        "--target-effect",
        type=float,
        metavar="X",
        help="also print how many seeds, texts or documents each headline test needs to detect a difference X",
    )
    plan.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    """Per GPU stage: the memory estimate and chosen batch on each card, tokens and model FLOPs."""
    from monolm.memory.estimates import GiB
    from monolm.memory.plans import A100_BF16_FLOPS, PLAN_MFU, plan_table

    cfg = config_from_args(args)
    logging.getLogger("monolm.planning").setLevel(logging.ERROR)  # the table says it all
    shape, rows = plan_table(cfg, tokens_per_doc=args.tokens_per_doc)
    print(
        f"{shape.name}: {shape.parameters:,} parameters, {shape.layers} layers, hidden {shape.hidden}, "
        f"vocab {shape.vocab}; preset {cfg.preset}, variant {cfg.constraint.variant}, seq_len {cfg.data.seq_len}"
    )
    if cfg.model.random_weights:
        print(f"NOTE: {cfg.model.name}")
    cards = [k for k in rows[0] if k not in ("stage", "tokens", "flops", "a100_hours")]
    print(f"{'stage':<16}" + "".join(f"{card + ' batch':>18}{'GiB':>7}" for card in cards), end="")
    print(f"{'tokens':>11}{'PFLOP':>9}{'A100 h':>8}  batch setting")
    failures = []
    for row in rows:
        line, setting = f"{row['stage']:<16}", ""
        for card in cards:
            plan = row[card]
            if isinstance(plan, Exception):
                line += f"{'does not fit':>18}{'-':>7}"
                failures.append(f"{row['stage']} on {card}: {plan}")
                continue
            batch = str(plan.chosen) + (f" x {plan.grad_accum_chosen}" if plan.grad_accum_chosen is not None else "")
            line += f"{batch:>18}{plan.estimate_bytes / GiB:>7.1f}"
            setting = plan.setting + (" x grad_accum_steps" if plan.grad_accum_chosen is not None else "")
        print(line + f"{row['tokens']:>11.3g}{row['flops'] / 1e15:>9.1f}{row['a100_hours']:>8.2f}  {setting}")
    print(
        f"GiB: estimated peak at the chosen batch (training keeps micro-batch x accumulation = the effective batch). "
        f"A100 h: model FLOPs at {PLAN_MFU:.0%} MFU of {A100_BF16_FLOPS / 1e12:.0f} TFLOP/s on one GPU, documents "
        f"of {args.tokens_per_doc} tokens (--tokens-per-doc); set runner.stage_timeout_minutes and the SLURM "
        "walltime with a margin above it."
    )
    for failure in failures:
        print(failure)
    print_power(cfg, args.target_effect)
    return 0


def print_power(cfg: ExperimentConfig, target: float | None) -> None:
    """The minimum detectable effect of each headline test (`monolm.study.power_plan`)."""
    from monolm.study import power_plan

    run_name, rows = power_plan.latest_comparable(cfg)
    source = f"run {run_name}" if run_name else "stated default"
    print()
    print(power_plan.format_power(power_plan.power_rows(cfg, power_plan.observed_sds(rows), source, target), target))
