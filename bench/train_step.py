"""What the constraint costs per training step: baseline vs constrained arm, same model, same batch.

Both sides run `monolm.training.training_step` (the loop's own step: token-weighted accumulation,
clipping, AdamW, schedule, and for the constrained arm the cached softplus plus the check of the
materialized weights after the step). The sides are interleaved (the order alternates each round)
and repeated, and medians are reported, so machine noise hits both alike.

    .venv/bin/python bench/train_step.py [--rounds 7 --steps 5 --variant mlp_both]

Ends with exactly one line `train_step_ratio=<constrained/baseline median step time>` (goal <= 1.10).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from monolm.config import ArmConfig
from monolm.constraint.softplus import constrained_modules
from monolm.core.runtime import pick_device, resolve_flag
from monolm.training import build_optimizer, training_step


class _Softplus(nn.Module):
    """Fallback W = softplus(V) (the study's `abs` init) when monolm.constraint.softplus is unavailable."""

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return F.softplus(v)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return torch.log(torch.expm1(w.abs() + 1e-6))


def neox_model(vocab: int, hidden: int, layers: int, max_positions: int) -> GPTNeoXForCausalLM:
    """The benchmarks' GPT-NeoX (heads of 64, a 4x FFN, untied embeddings), fp32 from torch seed 0:
    bench/train_vs_trainer.py builds its models here too, so both time the same architecture."""
    config = GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=4 * hidden,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(config).float()


def constrain(model: nn.Module, variant: str) -> str:
    try:
        from monolm.constraint.softplus import apply_constraint
    except ImportError:
        apply_constraint = None
    if apply_constraint is not None:
        apply_constraint(model, variant)
        return f"monolm.constraint.softplus {variant}"
    if variant != "mlp_both":
        raise SystemExit(
            f"monolm.constraint.softplus is not available; the fallback only implements mlp_both, not {variant}"
        )
    for layer in model.gpt_neox.layers:
        for lin in (layer.mlp.dense_h_to_4h, layer.mlp.dense_4h_to_h):
            parametrize.register_parametrization(lin, "weight", _Softplus())
    return "local softplus (FFN in+out)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--variant", default="mlp_both")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per side per round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()

    device = pick_device(args.device)
    base = neox_model(args.vocab, args.hidden, args.layers, max(256, args.seq))
    cons = copy.deepcopy(base)
    how = constrain(cons, args.variant)
    arm = ArmConfig(
        lr=5e-5,
        max_steps=10**6,
        warmup_ratio=0.0,
        micro_batch_size=args.batch,
        grad_accum_steps=1,
        bf16="auto",
        gradient_checkpointing="off",
    )
    bf16 = resolve_flag(arm.bf16, device)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))

    sides = {}
    for name, model, constrained in (("baseline", base, False), ("constrained", cons, True)):
        model.to(device).train()
        _, opt, sched = build_optimizer(model, arm, 10**6)
        sides[name] = (model, opt, sched, constrained)

    def run(name: str, steps: int) -> float:
        model, opt, sched, constrained = sides[name]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            training_step(model, opt, sched, batch, arm, constrained=constrained, bf16=bf16)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / steps

    for name in sides:
        run(name, args.warmup)
    times: dict[str, list[float]] = {name: [] for name in sides}
    order = list(sides)
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else reversed(order):
            times[name].append(run(name, args.steps))

    n_constrained = sum(m.weight.numel() for _, m in constrained_modules(cons))
    n_params = sum(p.numel() for p in base.parameters())
    tokens = args.batch * args.seq
    print(f"device={device} threads={torch.get_num_threads()} bf16_autocast={bf16} torch={torch.__version__}")
    print(
        f"GPT-NeoX hidden={args.hidden} layers={args.layers} vocab={args.vocab} seq={args.seq} "
        f"batch={args.batch}; {n_params / 1e6:.2f}M params, {n_constrained / 1e6:.2f}M constrained ({how})"
    )
    print(f"{args.rounds} interleaved rounds x {args.steps} steps per side after {args.warmup} warm-up steps")
    print(f"{'side':<12} {'median ms/step':>15} {'min':>8} {'max':>8} {'tokens/s':>10}")
    med = {}
    for name, ts in times.items():
        med[name] = statistics.median(ts)
        print(
            f"{name:<12} {med[name] * 1e3:>15.1f} {min(ts) * 1e3:>8.1f} {max(ts) * 1e3:>8.1f} "
            f"{tokens / med[name]:>10.0f}"
        )
    per_round = [c / b for b, c in zip(times["baseline"], times["constrained"], strict=True)]
    print(f"per-round ratios: {' '.join(f'{x:.3f}' for x in per_round)} (median {statistics.median(per_round):.3f})")
    print(f"train_step_ratio={med['constrained'] / med['baseline']:.3f}")


if __name__ == "__main__":
    main()
