"""The memory plan: estimates that track what PyTorch really holds (calibrated against the CPU's
measured peak), plans that keep the effective batch when they shrink the micro-batch, a clear stop
when nothing fits, the plan in every GPU stage's manifest, and `monolm plan`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from monolm.memory import estimates as memory
from monolm.memory.estimates import GiB, MemoryPlanError, ModelShape

ROOT = Path(__file__).resolve().parent.parent
PYTHIA_14B = ModelShape("pythia-1.4b", 24, 2048, 16, 8192, 50304, 1_414_647_808, 2048)


def test_micro_batch_candidates_divide_the_effective_batch():
    assert memory.micro_batch_candidates(4, 8) == [4, 2, 1]
    assert memory.micro_batch_candidates(6, 2) == [6, 4, 3, 2, 1]
    assert memory.micro_batch_candidates(1, 5) == [1]


def _plan(capacity, **kw):
    args = dict(
        stage="train_monotonic",
        micro_batch=4,
        grad_accum=8,
        seq_len=2048,
        bf16=True,
        checkpointing=True,
        constrained_parameters=PYTHIA_14B.constrained_parameters("mlp_in"),
        capacity=capacity,
        device="A100-40GB",
    )
    return memory.plan_training(PYTHIA_14B, **{**args, **kw})


def test_plan_keeps_the_batch_when_it_fits_and_shrinks_it_keeping_the_effective_batch():
    assert (_plan(None).chosen, _plan(None).grad_accum_chosen) == (4, 8)  # CPU: not enforced
    roomy = _plan(80 * GiB)
    assert (roomy.chosen, roomy.grad_accum_chosen, roomy.changed) == (4, 8, False)
    at = {m: memory.training_bytes(PYTHIA_14B, micro_batch=m, seq_len=2048, bf16=True, checkpointing=True,
                                   constrained_parameters=PYTHIA_14B.constrained_parameters("mlp_in"))["peak"]
          for m in (1, 2, 4)}  # fmt: skip
    assert at[1] <= at[2] < at[4]  # at small micro-batches the AdamW step is the peak
    tight = _plan((at[2] + at[4]) // 2)
    assert (tight.chosen, tight.grad_accum_chosen) == (2, 16)
    assert tight.chosen * tight.grad_accum_chosen == 32 and tight.changed
    assert "micro_batch_size 4 -> 2" in tight.describe() and "same effective batch" in tight.describe()
    assert tight.to_json()["estimate_bytes"] == at[2]


def test_nothing_fits_stops_with_model_card_and_estimate():
    with pytest.raises(MemoryPlanError) as err:
        _plan(10 * GiB)
    message = str(err.value)
    assert "pythia-1.4b" in message and "A100-40GB" in message and "10.0 GiB usable" in message
    assert "micro_batch_size=1 needs an estimated" in message


def test_estimate_components_move_the_right_way():
    def peak(**kw):
        args = dict(micro_batch=4, seq_len=2048, bf16=True, checkpointing=True, constrained_parameters=0)
        return memory.training_bytes(PYTHIA_14B, **{**args, **kw})

    base = peak()
    assert base["weights"] == base["gradients"] == 4 * PYTHIA_14B.parameters
    assert base["adamw_state"] == 8 * PYTHIA_14B.parameters
    n_c = PYTHIA_14B.constrained_parameters("mlp_in")
    assert n_c == 24 * 2048 * 8192
    assert peak(constrained_parameters=n_c)["constrained_w"] == 4 * n_c  # V kept, W materialised
    assert peak(checkpointing=False)["peak"] > base["peak"]
    assert peak(bf16=False, checkpointing=False)["peak"] > peak(checkpointing=False)["peak"]
    assert PYTHIA_14B.constrained_parameters("mlp_both") == 2 * n_c


def test_full_preset_fits_an_a100_40gb():
    from monolm.config import load_config
    from monolm.memory.plans import plan_table

    shape, rows = plan_table(load_config("full"))
    assert shape.parameters == 1_414_647_808
    for row in rows:
        plan = row["A100-40GB"]
        assert not isinstance(plan, Exception), f"{row['stage']}: {plan}"
        assert plan.estimate_bytes <= plan.capacity_bytes
        assert row["flops"] > 0 and row["tokens"] > 0


# --------------------------------------------------------------------------- calibration on the CPU
MEASURE = r"""
import json, os, sys
import torch
torch.set_num_threads(1)
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
from monolm.evaluation import perplexity as evaluation
from monolm.memory import estimates as memory
from monolm.config import ArmConfig
from monolm.training import build_optimizer, training_step
from monolm.training.step import enable_gradient_checkpointing

kind, h, L, V, b, T, ckpt, constrained = sys.argv[1], *map(int, sys.argv[2:])
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
def reset_peak():  # VmHWM restarts from the current RSS: earlier peaks (imports, warm-up) do not count
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
def peak_rss():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
def neox(h, L, V, T):
    cfg = GPTNeoXConfig(vocab_size=V, hidden_size=h, num_hidden_layers=L, num_attention_heads=max(1, h // 64),
                        intermediate_size=4 * h, max_position_embeddings=max(T, 16))
    return GPTNeoXForCausalLM(cfg).float()
# Warm up the libraries (lazy imports, kernels) on a tiny model, then measure from here.
warm = neox(64, 1, 64, 16)
warm(torch.randint(0, 64, (1, 8)), labels=torch.randint(0, 64, (1, 8))).loss.backward()
evaluation.perplexity(warm, [[1, 2, 3]], seq_len=8, batch_size=1, prefix_token_id=0, progress=False)
del warm
base = rss()
reset_peak()
model = neox(h, L, V, T)
P = sum(p.numel() for p in model.parameters())
shape = memory.ModelShape("x", L, h, max(1, h // 64), 4 * h, V, P, T)
n_c = 0
if constrained:
    from monolm.constraint.softplus import apply_constraint
    apply_constraint(model, "mlp_in")
    n_c = shape.constrained_parameters("mlp_in")
if kind == "train":
    if ckpt:
        enable_gradient_checkpointing(model)
    arm = ArmConfig(lr=1e-4, max_steps=10, micro_batch_size=b, grad_accum_steps=1, warmup_ratio=0.0)
    _, opt, sched = build_optimizer(model, arm, 10)
    model.train()
    batch = torch.randint(0, V, (b, T))
    for _ in range(3):
        training_step(model, opt, sched, batch, arm, constrained=bool(constrained), bf16=False)
    est = memory.training_bytes(shape, micro_batch=b, seq_len=T, bf16=False, checkpointing=bool(ckpt),
                                constrained_parameters=n_c, foreach_optimizer=False)
else:
    docs = [torch.randint(0, V, (T,)).tolist() for _ in range(b)]
    evaluation.perplexity(model, docs, seq_len=T, batch_size=b, prefix_token_id=0, progress=False, device="cpu")
    est = memory.inference_bytes(shape, batch=b, seq_len=T, bf16=False)
peak = peak_rss() - base
print(json.dumps({"measured": peak, "estimate": est["peak"]}))
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        ("train", 256, 4, 8192, 8, 256, 0, 0),
        ("train", 256, 4, 8192, 8, 256, 1, 0),  # gradient checkpointing
        ("train", 512, 4, 4096, 4, 512, 1, 1),  # constrained arm, checkpointing
        ("eval", 128, 2, 50304, 8, 128, 0, 0),  # Pythia's vocabulary: the logits dominate
    ],
    ids=["train", "train-checkpointing", "constrained-checkpointing", "eval-50k-vocab"],
)
def test_estimate_matches_the_measured_cpu_peak(case):
    """Peak RSS above a warmed-up baseline (the kernel's high-water mark, reset after the warm-up
    so that an earlier peak never counts), with glibc returning freed memory (a fixed mmap
    threshold), is what PyTorch held at its peak; the estimate may err on the safe side a little."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, *map(str, case)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    ratio = got["estimate"] / got["measured"]
    assert 0.95 <= ratio <= 1.25, (
        f"estimate {got['estimate'] / 2**20:.0f} MiB, measured {got['measured'] / 2**20:.0f} MiB"
    )
