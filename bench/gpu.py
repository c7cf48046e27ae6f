"""Every GPU stage at the study's real size: training steps of both arms, stage 4's perplexity, one
UAT and one HotFlip step, and a checkpoint of the constrained arm with its optimizer state.

The model is a shipped architecture with RANDOM weights (`monolm.models.catalogue`, nothing is
downloaded): speed and memory do not depend on the weights. Everything runs through the project's
own code: `training.training_step` (bf16 autocast, fp32 master weights and AdamW state, gradient
checkpointing as configured, the constrained arm's cached softplus and its check after every
step), `evaluation.perplexity`, the attacks' batched scoring (`bench/attacks.py` holds the steps
and the per-candidate loop they are compared with), and `checkpoint.save_checkpoint` /
`load_checkpoint`. No Prefect import.

    python bench/gpu.py --out gpu.json                      # CUDA: pythia-1.4b, the full preset's batch
    python bench/gpu.py --arch pythia-410m --steps 3        # any shipped architecture
    python bench/gpu.py                                     # CPU: a small GPT-NeoX, under two minutes

MFU is model FLOPs per second (6N + 12 L h T per token, no credit for recomputation) over the
dense matmul rate measured in the same run (bf16 on CUDA, fp32 on CPU). On the CPU it runs one
thread and times the process's CPU time (a shared machine's other work stays out). It ends with one
`key=value` line per figure and writes the whole record as JSON to `--out`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/attacks.py
import attacks as attack_bench  # noqa: E402

from monolm.attacks import scoring as common  # noqa: E402
from monolm.config import ArmConfig  # noqa: E402
from monolm.constraint.softplus import apply_constraint  # noqa: E402
from monolm.core.runtime import pick_device, resolve_flag  # noqa: E402
from monolm.data import splits as data_lib  # noqa: E402
from monolm.evaluation import perplexity as evaluation  # noqa: E402
from monolm.memory import estimates as memory  # noqa: E402
from monolm.models import catalogue as architectures  # noqa: E402
from monolm.models.shape import shape_of_config  # noqa: E402
from monolm.training import build_optimizer, training_step  # noqa: E402
from monolm.training.checkpoint import load_checkpoint, make_fingerprint, save_checkpoint  # noqa: E402
from monolm.training.step import enable_gradient_checkpointing  # noqa: E402

GB = 1e9
# On CUDA wall-clock time; on the CPU one thread and the process's CPU time, so that other work on
# a shared machine does not land in the figures (set in `run`).
clock = time.perf_counter


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, seconds: float = 1.0) -> tuple[float, str]:
    """Dense matmul FLOP/s measured here: bf16 8192^3 on CUDA, fp32 1024^3 on CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    count, t0 = 0, clock()
    while clock() - t0 < seconds:
        a @ b
        count += 1
    sync(device)
    return 2 * n**3 * count / (clock() - t0), f"{str(dtype).removeprefix('torch.')} {n}^3"


def small_architecture(args: argparse.Namespace) -> architectures.Architecture:
    """The CPU default: a GPT-NeoX of Pythia's kind at a size a CPU trains in seconds."""
    base = architectures.get("pythia-70m")
    config = {
        **base.config,
        "num_hidden_layers": args.layers,
        "hidden_size": args.hidden,
        "num_attention_heads": max(1, args.hidden // 64),
        "intermediate_size": 4 * args.hidden,
        "vocab_size": args.vocab,
    }
    return architectures.Architecture("small-neox", "", config, 0)


def build(arch: architectures.Architecture, device: torch.device, constrained: bool, variant: str):
    """A randomly initialised model of `arch` on `device`, constrained (W = softplus(V)) if asked."""
    model = architectures.build_model(arch, seed=0, device=str(device) if device.type == "cuda" else None)
    model.to(device)
    if constrained:
        apply_constraint(model, variant)
    return model


def peak_reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> float | None:
    """Peak allocated bytes since `peak_reset` (CUDA); None on CPU (the process's RSS peak is
    reported once, in `cpu_peak_rss_gb`; tests/test_memory.py calibrates the CPU estimate)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def train_arm(arch, shape, args, device, constrained: bool, peak_flops: float) -> tuple[dict[str, Any], Any]:
    """Timed optimizer steps of one arm; returns (figures, (model, optimizer, scheduler, names))."""
    peak_reset(device)
    model = build(arch, device, constrained, args.variant)
    arm = ArmConfig(
        lr=5e-5,
        max_steps=10**6,
        warmup_ratio=0.0,
        micro_batch_size=args.micro_batch,
        grad_accum_steps=args.grad_accum,
        bf16="auto",
        gradient_checkpointing=args.checkpointing,
    )
    bf16, checkpointing = resolve_flag(arm.bf16, device), resolve_flag(arm.gradient_checkpointing, device)
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    names, optimizer, scheduler = build_optimizer(model, arm, 10**6)
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(0, arch.vocab, (arm.effective_batch_size, args.seq_len), generator=gen)
    times = []
    for i in range(args.warmup + args.steps):
        sync(device)
        t0 = clock()
        training_step(model, optimizer, scheduler, batch, arm, constrained=constrained, bf16=bf16)
        sync(device)
        if i >= args.warmup:
            times.append(clock() - t0)
    step = statistics.median(times)
    tokens = arm.effective_batch_size * args.seq_len
    n_constrained = shape.constrained_parameters(args.variant) if constrained else 0
    estimate = memory.training_bytes(
        shape,
        micro_batch=arm.micro_batch_size,
        seq_len=args.seq_len,
        bf16=bf16,
        checkpointing=checkpointing,
        constrained_parameters=n_constrained,
        foreach_optimizer=device.type == "cuda",
    )["peak"]
    measured = peak_bytes(device)
    figures = {
        "step_s": step,
        "step_s_all": times,
        "tokens_per_s": tokens / step,
        "mfu": tokens * shape.train_flops_per_token(args.seq_len) / step / peak_flops,
        "peak_mem_gb": None if measured is None else measured / GB,
        "estimate_gb": estimate / GB,
        "estimate_over_measured": None if measured is None else estimate / measured,
        "bf16": bf16,
        "gradient_checkpointing": checkpointing,
        "micro_batch": arm.micro_batch_size,
        "grad_accum": arm.grad_accum_steps,
    }
    return figures, (model, optimizer, scheduler, names, arm)


def bench_eval(model, args, device) -> dict[str, Any]:
    """Stage 4's perplexity on random documents (lengths up to two windows): tokens/s."""
    gen = torch.Generator().manual_seed(2)
    vocab = model.get_input_embeddings().weight.shape[0]
    lengths = torch.randint(args.seq_len // 4, 2 * args.seq_len, (args.eval_docs,), generator=gen).tolist()
    docs = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]
    kw = dict(seq_len=args.seq_len, batch_size=args.eval_batch, prefix_token_id=0, device=device, progress=False)
    evaluation.perplexity(model, docs[:2], **kw)  # warm-up
    sync(device)
    t0 = clock()
    result = evaluation.perplexity(model, docs, **kw)
    sync(device)
    seconds = clock() - t0
    return {"tokens": result["tokens"], "seconds": seconds, "tokens_per_s": result["tokens"] / seconds}


def same_choice(batched, loop, what: str) -> bool:
    """The two sides chose the same candidate; otherwise the two candidates' scores must be tied
    within the sides' numerical disagreement (bf16), or the bench fails."""
    (scores_b, choice_b), (scores_l, choice_l) = batched, loop
    if choice_b == choice_l:
        return True
    tolerance = float((scores_b - scores_l).abs().max())
    gap = abs(float(scores_b[choice_b] - scores_b[choice_l]))
    assert gap <= tolerance, f"{what}: batched chose {choice_b}, the loop {choice_l} (gap {gap:.3g} > {tolerance:.3g})"
    print(f"  {what}: a tie within numerical noise (gap {gap:.2g} <= {tolerance:.2g}); both choices are correct")
    return False


def bench_attacks(model, args, device) -> dict[str, Any]:
    """One UAT step, one HotFlip step and one GCG step, batched scoring vs one forward per candidate."""
    docs = data_lib.embedded_documents()[:400]
    rows = model.get_input_embeddings().weight.shape[0]
    tokenizer = data_lib.train_bpe_tokenizer(docs[40:], min(2000, rows))  # texts' ids must be rows
    allowed = common.allowed_token_mask(tokenizer, rows)
    prefix = common.context_prefix(tokenizer)
    held = common.truncate(data_lib.tokenize(tokenizer, docs[:40]), args.text_tokens)
    texts, text = held[: args.uat_texts], held[args.uat_texts]
    allowed_ids = torch.nonzero(allowed).flatten()
    trigger = allowed_ids[torch.randint(len(allowed_ids), (5,), generator=torch.Generator().manual_seed(0))]
    out: dict[str, Any] = {}
    with common.attack_mode(model):
        sides = {
            name: (lambda s=scorer: attack_bench.uat_step(model, texts, trigger, 2, args.uat_top_k, allowed, prefix, s))
            for name, scorer in (("batched", attack_bench.batched), ("loop", attack_bench.loop))
        }
        med, res = attack_bench.interleaved({k: _synced(v, device) for k, v in sides.items()}, args.repeats)
        candidates = (args.uat_top_k + 1) * len(texts)
        out["uat"] = _attack_figures(med, candidates, same_choice(res["batched"], res["loop"], "UAT"))
        sides = {
            name: (lambda n=name: attack_bench.hotflip_step(model, text, args.hotflip_top_b, allowed, prefix, n))
            for name in ("batched", "loop")
        }
        med, res = attack_bench.interleaved({k: _synced(v, device) for k, v in sides.items()}, args.repeats)
        out["hotflip"] = _attack_figures(
            med, args.hotflip_top_b + 1, same_choice(res["batched"], res["loop"], "HotFlip")
        )
        width, topk = args.uat_top_k, min(64, int(allowed.sum()))  # GCG: as many candidates as UAT's step
        sides = {
            name: (lambda s=scorer: attack_bench.gcg_step(model, texts, trigger, width, topk, allowed, prefix, s))
            for name, scorer in (("batched", attack_bench.batched), ("loop", attack_bench.loop))
        }
        med, res = attack_bench.interleaved({k: _synced(v, device) for k, v in sides.items()}, args.repeats)
        out["gcg"] = _attack_figures(med, width * len(texts), same_choice(res["batched"], res["loop"], "GCG"))
    return out


def _synced(fn, device):
    def run():
        out = fn()
        sync(device)
        return out

    return run


def _attack_figures(med: dict[str, float], candidates: int, same: bool) -> dict[str, Any]:
    return {
        "batched_s": med["batched"],
        "loop_s": med["loop"],
        "speedup": med["loop"] / med["batched"],
        "candidates": candidates,
        "candidates_per_s_batched": candidates / med["batched"],
        "candidates_per_s_loop": candidates / med["loop"],
        "same_choice": same,
    }


def bench_checkpoint(state, args) -> dict[str, Any]:
    """Save and load the constrained arm with its AdamW state, the way the training loop does
    (wall-clock time: it is disk and hashing work)."""
    model, optimizer, scheduler, names, arm = state
    fingerprint = make_fingerprint(model, config=arm.model_dump(mode="json"), run={"bench": True})
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        t0 = time.perf_counter()
        path = save_checkpoint(
            tmp,
            1,
            model=model,
            optimizer=optimizer,
            param_names=names,
            scheduler=scheduler,
            state={},
            fingerprint=fingerprint,
        )
        saved = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        t0 = time.perf_counter()
        load_checkpoint(
            path, model=model, optimizer=optimizer, param_names=names, scheduler=scheduler, fingerprint=fingerprint
        )
        loaded = time.perf_counter() - t0
    return {"save_s": saved, "load_s": loaded, "bytes": size, "gb": size / GB}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--arch", help=f"{', '.join(architectures.names())} or small (default: pythia-1.4b on CUDA)")
    p.add_argument("--hidden", type=int, default=256, help="small architecture only")
    p.add_argument("--layers", type=int, default=4, help="small architecture only")
    p.add_argument("--vocab", type=int, default=4096, help="small architecture only")
    p.add_argument("--seq-len", type=int, help="default: 2048 on CUDA, 128 on CPU")
    p.add_argument("--micro-batch", type=int, help="default: the memory plan's choice for the full preset's 4")
    p.add_argument("--grad-accum", type=int, help="default: 8 on CUDA (the full preset), 1 on CPU")
    p.add_argument("--checkpointing", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--variant", default="mlp_in")
    p.add_argument("--steps", type=int, help="timed optimizer steps per arm (default 5 CUDA, 3 CPU)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--eval-docs", type=int, help="default 64 CUDA, 16 CPU")
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--uat-texts", type=int, help="default 16 CUDA, 6 CPU")
    p.add_argument("--uat-top-k", type=int, help="default 64 CUDA, 12 CPU")
    p.add_argument("--hotflip-top-b", type=int, help="default 64 CUDA, 24 CPU")
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, help="interleaved repeats of each attack side (default 3 CUDA, 2 CPU)")
    p.add_argument("--skip", nargs="*", default=[], choices=["train", "eval", "attacks", "checkpoint"])
    p.add_argument("--tmp", default=None, help="folder for the checkpoint (default: the system's temp folder)")
    p.add_argument("--out", type=Path, help="write the full record as JSON here")
    args = p.parse_args(argv)
    cuda = pick_device(args.device).type == "cuda"
    args.arch = args.arch or ("pythia-1.4b" if cuda else "small")
    args.seq_len = args.seq_len or (2048 if cuda else 128)
    args.grad_accum = args.grad_accum or (8 if cuda else 1)
    args.steps = args.steps or (5 if cuda else 3)
    args.eval_docs = args.eval_docs or (64 if cuda else 16)
    args.uat_texts = args.uat_texts or (16 if cuda else 6)
    args.uat_top_k = args.uat_top_k or (64 if cuda else 12)
    args.hotflip_top_b = args.hotflip_top_b or (64 if cuda else 24)
    args.repeats = args.repeats or (3 if cuda else 2)
    return args


def choose_micro_batch(shape, args, device) -> tuple[int, dict[str, Any] | None]:
    """`--micro-batch`, or on CUDA the memory plan's choice for 4 (the full preset's) on this card."""
    if args.micro_batch:
        return args.micro_batch, None
    if device.type != "cuda":
        return 4, None
    capacity, description = memory.device_capacity(device)
    plan = memory.plan_training(
        shape,
        stage="bench",
        micro_batch=4,
        grad_accum=args.grad_accum,
        seq_len=args.seq_len,
        bf16=True,
        checkpointing=resolve_flag(args.checkpointing, device),
        constrained_parameters=shape.constrained_parameters(args.variant),
        capacity=capacity,
        device=description,
    )
    args.grad_accum = plan.grad_accum_chosen
    return plan.chosen, plan.to_json()


def run(args: argparse.Namespace) -> dict[str, Any]:
    global clock
    device = pick_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
        clock = attack_bench.CLOCK = time.process_time
    arch = small_architecture(args) if args.arch == "small" else architectures.get(args.arch)
    shape = shape_of_config(architectures.hf_config(arch), arch.name)
    args.micro_batch, plan = choose_micro_batch(shape, args, device)
    rate, how = matmul_rate(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    record: dict[str, Any] = {
        "device": f"{device} ({name})",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": f"{arch.name} (RANDOM WEIGHTS)",
        "parameters": shape.parameters,
        "seq_len": args.seq_len,
        "matmul_tflops": rate / 1e12,
        "matmul": how,
        "memory_plan": plan,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    print(f"{record['device']}, torch {torch.__version__}; {record['model']}, {shape.parameters:,} parameters")
    print(f"matmul rate ({how}): {rate / 1e12:.3g} TFLOP/s")
    if "train" not in args.skip:
        record.update(run_training(arch, shape, args, device, rate))
    if "eval" not in args.skip or "attacks" not in args.skip:
        record.update(run_scoring(arch, args, device))
    if device.type == "cpu":
        record["cpu_peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
    return record


def run_training(arch, shape, args, device, rate: float) -> dict[str, Any]:
    """Both arms one after the other (each alone on the device: its own peak memory), and the
    constrained arm's checkpoint while its optimizer state exists."""
    out: dict[str, Any] = {"train": {}}
    for arm, constrained in (("baseline", False), ("monotonic", True)):
        figures, state = train_arm(arch, shape, args, device, constrained, rate)
        out["train"][arm] = figures
        print(_train_line(arm, figures))
        if constrained and "checkpoint" not in args.skip:
            c = out["checkpoint"] = bench_checkpoint(state, args)
            print(f"checkpoint (constrained arm + AdamW state): {c['save_s']:.1f} s save, {c['load_s']:.1f} s load, "
                  f"{c['gb']:.2f} GB")  # fmt: skip
        del state
        peak_reset(device)
    out["train"]["step_ratio"] = out["train"]["monotonic"]["step_s"] / out["train"]["baseline"]["step_s"]
    return out


def run_scoring(arch, args, device) -> dict[str, Any]:
    """Stage 4's perplexity and the attack steps on a fresh (random) baseline model."""
    out: dict[str, Any] = {}
    model = build(arch, device, False, args.variant)
    if "eval" not in args.skip:
        e = out["eval"] = bench_eval(model, args, device)
        print(f"stage 4 perplexity: {e['tokens_per_s']:,.0f} tokens/s ({e['tokens']} tokens in {e['seconds']:.2f} s)")
    if "attacks" not in args.skip:
        out["attacks"] = bench_attacks(model, args, device)
        for what, fig in out["attacks"].items():
            print(f"{what} step: batched {fig['batched_s'] * 1e3:.0f} ms, loop {fig['loop_s'] * 1e3:.0f} ms "
                  f"({fig['speedup']:.2f}x; {fig['candidates_per_s_batched']:,.0f} candidates/s)")  # fmt: skip
    del model
    return out


def _train_line(arm: str, f: dict[str, Any]) -> str:
    peak = "n/a" if f["peak_mem_gb"] is None else f"{f['peak_mem_gb']:.1f} GB"
    return (
        f"train {arm:<9}: {f['step_s'] * 1e3:.0f} ms/step, {f['tokens_per_s']:,.0f} tokens/s, MFU {f['mfu']:.1%}, "
        f"peak {peak} (estimate {f['estimate_gb']:.1f} GB), micro-batch {f['micro_batch']} x {f['grad_accum']}"
    )


def key_values(record: dict[str, Any]) -> dict[str, Any]:
    """The figures as flat `key=value` pairs (the last lines of the output)."""
    out: dict[str, Any] = {
        "device": record["device"].replace(" ", "_"),
        "matmul_tflops": f"{record['matmul_tflops']:.3g}",
    }
    train = record.get("train")
    if train:
        for arm in ("baseline", "monotonic"):
            f = train[arm]
            out[f"train_tokens_per_s_{arm}"] = round(f["tokens_per_s"])
            out[f"train_mfu_{arm}"] = round(f["mfu"], 3)
            out[f"peak_mem_gb_{arm}"] = "nan" if f["peak_mem_gb"] is None else round(f["peak_mem_gb"], 2)
            out[f"mem_estimate_gb_{arm}"] = round(f["estimate_gb"], 2)
        out["train_step_ratio"] = round(train["step_ratio"], 3)
    if "eval" in record:
        out["eval_tokens_per_s"] = round(record["eval"]["tokens_per_s"])
    for what, fig in (record.get("attacks") or {}).items():
        out[f"{what}_speedup"] = round(fig["speedup"], 2)
        out[f"{what}_candidates_per_s"] = round(fig["candidates_per_s_batched"])
    if "checkpoint" in record:
        c = record["checkpoint"]
        out.update(
            checkpoint_save_s=round(c["save_s"], 2),
            checkpoint_load_s=round(c["load_s"], 2),
            checkpoint_gb=round(c["gb"], 2),
        )
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    started = time.perf_counter()
    record = run(args)
    record["wall_s"] = time.perf_counter() - started
    record["key_values"] = key_values(record)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"total {record['wall_s']:.0f} s")
    for key, value in record["key_values"].items():
        print(f"{key}={value}")


if __name__ == "__main__":
    main()
