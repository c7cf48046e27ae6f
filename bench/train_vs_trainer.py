"""monolm's training loop against a plain `transformers.Trainer` on the same model, data, batch,
optimizer and precision: the time of one optimizer step, measured as the difference between a run
of `--steps` steps and a run of 2 (set-up, first-step costs and the model's construction cancel;
data handling, accumulation, clipping, AdamW, the schedule and each loop's own logging count). On
the CPU one thread and the process's CPU time (a shared machine's other work stays out).

transformers.Trainer needs accelerate, a bench-only extra: like bench/eval_vs_lmeval.py this
script re-runs itself in the scratch environment of `bench/peers-env.sh` (`.bench-env/`).

    .venv/bin/python bench/train_vs_trainer.py [--steps 12 --micro-batch 8 --grad-accum 2]

monolm runs `monolm.training.train` (the loop of stages 2 and 3 with its default logging every
10 steps, no evaluation, no checkpoint); the Trainer runs with logging, saving and evaluation off.
Both: AdamW (betas 0.9/0.95, weight decay 0.01), clipping at 1.0, cosine schedule, fp32 on CPU
(bf16 autocast and the same gradient checkpointing on CUDA). Ends with
`train_speed_ratio=<Trainer step time / monolm step time>` (goal >= 1).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_vs_lmeval import _ensure_lm_eval  # noqa: E402  (the same scratch environment)


def make_model(args):
    from train_step import neox_model  # the same GPT-NeoX as bench/train_step.py

    return neox_model(args.vocab, args.hidden, args.layers, max(args.seq_len, 64))


def monolm_run(args, blocks, device, steps: int) -> None:
    from monolm.config import ArmConfig
    from monolm.training import train

    arm = ArmConfig(
        lr=5e-5,
        max_steps=steps,
        epochs=1000.0,
        warmup_ratio=0.0,
        schedule="cosine",
        micro_batch_size=args.micro_batch,
        grad_accum_steps=args.grad_accum,
        eval_every_steps=10**9,
        checkpoint_every_steps=10**9,
        checkpoint_every_minutes=10**6,
        gradient_checkpointing="auto",
        bf16="auto",
    )
    with tempfile.TemporaryDirectory() as tmp:
        train(
            make_model(args),
            blocks,
            arm,
            Path(tmp),
            seed=0,
            evaluate=None,
            device=device,
            progress=False,
        )


def trainer_run(args, blocks, device, steps: int) -> None:
    from transformers import Trainer, TrainingArguments

    rows = [{"input_ids": b, "labels": b} for b in blocks]
    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=args.micro_batch,
            gradient_accumulation_steps=args.grad_accum,
            max_steps=steps,
            learning_rate=5e-5,
            weight_decay=0.01,
            adam_beta1=0.9,
            adam_beta2=0.95,
            adam_epsilon=1e-8,
            max_grad_norm=1.0,
            lr_scheduler_type="cosine",
            warmup_steps=0,
            logging_strategy="no",
            save_strategy="no",
            eval_strategy="no",
            report_to=[],
            use_cpu=not cuda,
            bf16=cuda,
            gradient_checkpointing=cuda,
            dataloader_num_workers=0,
            disable_tqdm=True,
            seed=0,
            optim="adamw_torch",
        )
        Trainer(model=make_model(args), args=targs, train_dataset=rows).train()


def step_time(run, args, blocks, device, clock) -> float:
    """(time of `--steps` steps - time of 2 steps) / (`--steps` - 2)."""
    times = {}
    for steps in (2, args.steps):
        t0 = clock()
        run(args, blocks, device, steps)
        times[steps] = clock() - t0
    return (times[args.steps] - times[2]) / (args.steps - 2)


# The command line: every option is a whole number (flag, default, help).
INT_OPTIONS = (
    ("--hidden", 256, None),
    ("--layers", 4, None),
    ("--vocab", 8192, None),
    ("--seq-len", 128, None),
    ("--micro-batch", 8, None),
    ("--grad-accum", 2, None),
    ("--steps", 12, "optimizer steps of the longer run (the shorter has 2)"),
    ("--rounds", 3, "sides run alternately this many times"),
    ("--threads", 1, None),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default, text in INT_OPTIONS:
        parser.add_argument(flag, type=int, default=default, help=text)
    args = parser.parse_args()
    _ensure_lm_eval()

    import torch
    import transformers

    from monolm.core.runtime import pick_device

    torch.set_num_threads(args.threads)
    device = pick_device()
    gen = torch.Generator().manual_seed(1)
    n = args.steps * args.micro_batch * args.grad_accum
    blocks = torch.randint(0, args.vocab, (n, args.seq_len), generator=gen)
    print(
        f"{device}, torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} "
        f"thread(s); GPT-NeoX hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; "
        f"{args.micro_batch} x {args.grad_accum} sequences of {args.seq_len} tokens per step"
    )
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    sides = {"monolm": monolm_run, "Trainer": trainer_run}
    times: dict[str, list[float]] = {name: [] for name in sides}
    for rnd in range(args.rounds):
        for name in list(sides) if rnd % 2 == 0 else list(sides)[::-1]:
            times[name].append(step_time(sides[name], args, blocks, device, clock))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    tokens = args.micro_batch * args.grad_accum * args.seq_len
    for name, t in med.items():
        each = " ".join(f"{x * 1e3:.0f}" for x in times[name])
        print(f"{name:<8} median {t * 1e3:7.1f} ms/step ({tokens / t:,.0f} tokens/s); rounds: {each} ms")
    rounds = [t / m for m, t in zip(times["monolm"], times["Trainer"], strict=True)]
    print(f"per-round Trainer/monolm ratios: {' '.join(f'{r:.2f}' for r in rounds)}")
    print(f"train_speed_ratio={med['Trainer'] / med['monolm']:.2f}")


if __name__ == "__main__":
    main()
