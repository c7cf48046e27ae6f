"""Batched exact re-scoring vs. a per-candidate loop, for one UAT step and one HotFlip step.

Both sides do the same work on the same model with the same candidates: the gradient, the
first-order candidate selection, then the exact loss of every candidate sequence. They differ
only in how candidates are scored:

* batched  — what the attacks run: `common.score_candidates_batched` for UAT (many candidate
  sequences per forward pass, length-sorted, each batch cut to its longest row) and
  `flip_scoring.score_flips` for HotFlip (the same, plus reuse of the current text's keys/values
  before the earliest flip of each batch);
* loop     — `common.score_candidates_loop`: one forward pass per candidate sequence (for UAT,
  per candidate trigger and text). The original study's UAT scored one candidate trigger at a
  time over its texts, 8 per forward pass, which is printed as "original"; its HotFlip
  re-scored no candidates at all.

The script asserts that both sides produce the same losses (to float tolerance) and choose the
same candidate, interleaves the two sides (alternating which goes first), repeats, and reports
medians. For UAT it also prints, for information, the original study's own scoring
(`compute_trigger_loss` in its stage 5: one candidate trigger at a time, its texts 8 per forward
pass) and one forward per candidate trigger over the whole text batch. A GCG step (one-hot
gradient, top-k, `--gcg-width` candidates from a fixed generator, exact scoring of every
candidate over the texts) is timed the same way.
It ends with the lines `uat_speedup=<loop/batched>`, `hotflip_speedup=<loop/batched>` and
`gcg_speedup=<loop/batched>` (whole-step time ratios), after the batching ceiling.

    .venv/bin/python bench/attacks.py [--repeats 5] [--train-steps 60]
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from collections.abc import Callable

import torch

from monolm.attacks import flip_scoring, flip_search, gcg_search, trigger_search
from monolm.attacks import scoring as common
from monolm.config import TinyModelConfig
from monolm.core.runtime import bf16_enabled, model_device
from monolm.data import splits as data_lib
from monolm.models import loading as models


def build_model(train_steps: int, seed: int = 0):
    """GPT-NeoX, hidden 256, 4 layers, on a BPE tokenizer of the embedded corpus; briefly
    trained so that losses and gradients look like a language model's, not random init's."""
    docs = data_lib.embedded_documents()
    random.Random(seed).shuffle(docs)
    held, train = docs[:100], docs[100:]
    tok = data_lib.train_bpe_tokenizer(train, 2000)
    tiny = TinyModelConfig(vocab_size=2000, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024)
    model = models.build_tiny_model(tiny, tok, seed=seed)
    if train_steps:
        blocks = data_lib.pack_blocks(data_lib.tokenize(tok, train), 64, tok.eos_token_id)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        model.train()
        for _ in range(train_steps):
            batch = blocks[torch.randint(len(blocks), (16,), generator=gen)]
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        print(f"trained {train_steps} steps, final train loss {loss.item():.3f}")
    model.eval()
    return model, tok, data_lib.tokenize(tok, held)


Scorer = Callable[[torch.nn.Module, common.TextBatch], torch.Tensor]


def bf16(model) -> bool:
    """The attacks' default: bf16 autocast on CUDA only."""
    return bf16_enabled("auto", model_device(model), cuda_only=True)


def batched(model, batch, per_token=False):
    return common.score_candidates_batched(model, batch, batch_size=128, per_token=per_token, bf16=bf16(model))


def loop(model, batch, per_token=False):
    return common.score_candidates_loop(model, batch, per_token=per_token, bf16=bf16(model))


def uat_step(model, texts, trigger, position, top_k, allowed, prefix, scorer: Scorer):
    """One UAT position step (gradient, top-k, exact scoring of all k triggers over the batch)."""
    tt = trigger_search.text_batch(texts, True)
    cur = trigger_search.with_triggers(prefix, trigger.view(1, -1), tt)
    grad, _ = common.embedding_gradient(model, cur.input_ids, cur.attention_mask, cur.target_mask, bf16=bf16(model))
    g = grad[:, len(prefix) + position].mean(0, keepdim=True)
    scores = common.first_order_scores(g, model.get_input_embeddings().weight, allowed)[0]
    scores[trigger[position]] = float("-inf")
    tokens = torch.cat([trigger[position].view(1), torch.topk(scores, top_k).indices])
    cands = trigger.view(1, -1).repeat(len(tokens), 1)
    cands[:, position] = tokens
    b = trigger_search.with_triggers(prefix, cands, tt)
    losses = scorer(model, b).view(len(tokens), len(texts)).mean(1)
    return losses, int(torch.argmax(losses))


def uat_group_loop(model, batch, n_texts, texts_per_forward):
    """Informational variants: one candidate trigger at a time, its `n_texts` texts
    `texts_per_forward` per forward pass (8: the original study's scoring; n_texts: one forward
    per trigger). Rows of a trigger are length-sorted, which only helps these variants."""
    out = []
    for start in range(0, batch.input_ids.shape[0], n_texts):
        rows = batch.rows(slice(start, start + n_texts))
        out.append(common.score_candidates_batched(model, rows, batch_size=texts_per_forward, bf16=bf16(model)))
    return torch.cat(out)


def hotflip_step(model, text, top_b, allowed, prefix, side: str):
    """One HotFlip flip step (gradient, top-B swaps, exact scoring on matching target sets).

    batched: `flip_scoring.score_flips` (what the attack runs: candidates sorted by position, batched,
    reusing the current text's keys/values before the earliest flip of each batch);
    loop: one full forward pass per candidate sequence."""
    cur = torch.tensor([*prefix, *text])
    targets = flip_search.base_targets(len(prefix), len(text))
    open_pos = torch.arange(len(prefix), len(cur))
    pos, tok = flip_search._gradient_candidates(model, cur, targets, open_pos, allowed, top_b, bf16=bf16(model))
    if side == "batched":
        before, after = flip_scoring.score_flips(
            model, cur, targets, pos, tok, sizer=common.BatchSizer(128), bf16=bf16(model)
        )
    else:
        B = len(pos)
        ids = cur.view(1, -1).repeat(B + 1, 1)
        ids[torch.arange(1, B + 1), pos] = tok
        tm = torch.cat([targets.view(1, -1), flip_scoring.flip_target_masks(targets, pos)])
        tl = loop(model, common.TextBatch(ids, torch.ones_like(ids), tm), per_token=True)
        before = common.masked_mean(tl[0].expand(B, -1), tm[1:])
        after = common.masked_mean(tl[1:], tm[1:])
    gains = after - before
    return gains, int(torch.argmax(gains))


# What `timed` measures: wall-clock time; bench/gpu.py switches the CPU to the process's CPU time.
CLOCK = time.perf_counter


def timed(fn):
    t0 = CLOCK()
    out = fn()
    return CLOCK() - t0, out


def interleaved(sides: dict[str, Callable], repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    times: dict[str, list[float]] = {name: [] for name in sides}
    results: dict[str, object] = {}
    names = list(sides)
    for rep in range(repeats):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            dt, out = timed(sides[name])
            times[name].append(dt)
            results[name] = out
    return {name: statistics.median(ts) for name, ts in times.items()}, results


def compare(sides: dict[str, Callable], repeats: int, choice: str, article: str = "") -> dict[str, float]:
    """Time `sides` interleaved and check each against "batched": the same values (to float
    tolerance) and the same chosen `choice`; prints and returns each side's median time."""
    med, res = interleaved(sides, repeats)
    for name in [n for n in sides if n != "batched"]:
        torch.testing.assert_close(res["batched"][0], res[name][0], atol=5e-5, rtol=1e-5)
        assert res["batched"][1] == res[name][1], f"{article}{name} chose another {choice}"
    for name, t in med.items():
        print(f"  {name:<11} median {t * 1000:8.1f} ms")
    return med


def bench_uat(model, texts, trigger, allowed, prefix, args: argparse.Namespace) -> float:
    """Batched vs. per-candidate scoring of one UAT step; returns the loop/batched time ratio."""
    top_k = args.uat_top_k
    print(
        f"\nUAT step: trigger length {len(trigger)}, {len(texts)} texts of <= {args.text_tokens} tokens, "
        f"top-k {top_k} -> {(top_k + 1) * len(texts)} candidate sequences"
    )

    def step(scorer: Scorer):
        return lambda: uat_step(model, texts, trigger, 2, top_k, allowed, prefix, scorer)

    sides = {
        "batched": step(batched),
        "loop": step(loop),
        "original": step(lambda m, b: uat_group_loop(m, b, len(texts), 8)),
        "group-loop": step(lambda m, b: uat_group_loop(m, b, len(texts), len(texts))),
    }
    med = compare(sides, args.repeats, "candidate")
    speedup = med["loop"] / med["batched"]
    print(
        f"  same losses and same chosen token; batched is {speedup:.2f}x the per-candidate loop, "
        f"{med['original'] / med['batched']:.2f}x the original study's scoring (8 texts per forward), "
        f"{med['group-loop'] / med['batched']:.2f}x one forward per trigger"
    )
    return speedup


def bench_hotflip(model, text, allowed, prefix, top_b: int, repeats: int) -> float:
    """Batched (prefix-reusing) vs. per-candidate scoring of one HotFlip step; returns the
    loop/batched time ratio."""
    print(f"\nHotFlip step: one text of {len(text)} tokens, top-B {top_b} -> {top_b + 1} candidate sequences")
    sides = {
        "batched": lambda: hotflip_step(model, text, top_b, allowed, prefix, "batched"),
        "loop": lambda: hotflip_step(model, text, top_b, allowed, prefix, "loop"),
    }
    med = compare(sides, repeats, "flip", "the ")
    speedup = med["loop"] / med["batched"]
    print(f"  same gains and same chosen flip; batched is {speedup:.2f}x the per-candidate loop")
    return speedup


def gcg_step(model, texts, trigger, width, topk, allowed, prefix, scorer: Scorer):
    """One universal-GCG step (one-hot gradient over the texts, top-k per position, `width`
    candidates from a fixed generator so both sides score the same ones, exact scoring)."""
    setup = common.AttackSetup.of(model, prefix, 128, "auto")
    tt = trigger_search.text_batch(texts, True)
    grad = gcg_search.one_hot_gradient(setup, tt, trigger.to("cpu"), len(texts))
    grad[:, ~allowed.to(grad.device)] = float("-inf")
    topk_ids = grad.topk(topk, dim=1).indices.cpu()
    gen = torch.Generator().manual_seed(0)
    cands = gcg_search.sample_candidates(
        trigger, width, 1, gen, topk_ids=topk_ids, allowed_ids=torch.nonzero(allowed).flatten()
    )
    losses = scorer(model, trigger_search.with_triggers(prefix, cands, tt)).view(width, len(texts)).mean(1)
    return losses, int(torch.argmax(losses))


def bench_gcg(model, texts, trigger, allowed, prefix, width: int, repeats: int) -> float:
    """Batched vs. one-candidate-sequence-per-forward scoring of one GCG step; returns the
    loop/batched time ratio."""
    print(
        f"\nGCG step: trigger length {len(trigger)}, {len(texts)} texts, "
        f"width {width} -> {width * len(texts)} candidate sequences"
    )
    sides = {
        "batched": lambda: gcg_step(model, texts, trigger, width, 64, allowed, prefix, batched),
        "loop": lambda: gcg_step(model, texts, trigger, width, 64, allowed, prefix, loop),
    }
    med = compare(sides, repeats, "candidate", "the ")
    speedup = med["loop"] / med["batched"]
    print(f"  same losses and same chosen candidate; batched is {speedup:.2f}x the per-candidate loop")
    return speedup


def bench_ceiling(model, texts, trigger, prefix, repeats: int) -> None:
    """How much can batching gain at all here? The same forward passes, one row at a time vs. the
    batched scorer: if the machine is compute-bound at batch 1, no batching can beat it."""
    b = trigger_search.with_triggers(prefix, trigger.view(1, -1).repeat(4, 1), trigger_search.text_batch(texts, True))
    n_rows = b.input_ids.shape[0]
    med, _ = interleaved({"batched": lambda: batched(model, b), "loop": lambda: loop(model, b)}, repeats)
    print(
        f"\nforward passes only ({n_rows} sequences): one at a time "
        f"{med['loop'] / n_rows * 1000:.2f} ms/sequence, batched {med['batched'] / n_rows * 1000:.2f} "
        f"ms/sequence -> batching alone can gain at most ~{med['loop'] / med['batched']:.2f}x on this machine"
    )


# The command line: every option is a whole number (flag: default).
INT_OPTIONS = {
    "--repeats": 5,
    "--train-steps": 60,
    "--uat-texts": 16,
    "--uat-top-k": 64,
    "--hotflip-top-b": 64,
    "--gcg-width": 64,
    "--text-tokens": 64,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default in INT_OPTIONS.items():
        parser.add_argument(flag, type=int, default=default)
    args = parser.parse_args()

    print(
        f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
        f"torch {torch.__version__}"
    )
    model, tok, held = build_model(args.train_steps)
    allowed = common.allowed_token_mask(tok, model.get_input_embeddings().weight.shape[0])
    prefix = common.context_prefix(tok)
    texts = common.truncate(held[: args.uat_texts], args.text_tokens)
    gen = torch.Generator().manual_seed(0)
    allowed_ids = torch.nonzero(allowed).flatten()
    trigger = allowed_ids[torch.randint(len(allowed_ids), (5,), generator=gen)]
    text = common.truncate([held[args.uat_texts]], args.text_tokens)[0]
    print(f"model: GPT-NeoX hidden 256, 4 layers, {models.count_parameters(model) / 1e6:.1f}M parameters")
    with common.attack_mode(model):
        uat_speedup = bench_uat(model, texts, trigger, allowed, prefix, args)
        hotflip_speedup = bench_hotflip(model, text, allowed, prefix, args.hotflip_top_b, args.repeats)
        gcg_speedup = bench_gcg(model, texts, trigger, allowed, prefix, args.gcg_width, args.repeats)
        bench_ceiling(model, texts, trigger, prefix, args.repeats)
    print(f"\nuat_speedup={uat_speedup:.2f}")
    print(f"hotflip_speedup={hotflip_speedup:.2f}")
    print(f"gcg_speedup={gcg_speedup:.2f}")


if __name__ == "__main__":
    main()
