"""Stage 4's perplexity against lm-evaluation-harness's `HFLM.loglikelihood_rolling`: same model,
same documents, same window and batch size; per-document log-likelihoods compared, times measured
side by side (interleaved, repeated, medians).

lm-eval is a bench-only extra: it is installed into a scratch environment (`bench/peers-env.sh`,
`.bench-env/`), never into the project's. Run from the project's interpreter, this script
re-runs itself there:

    .venv/bin/python bench/eval_vs_lmeval.py [--batch-sizes 1 8 --docs 40 --repeats 5]

By default the model is the `tiny` preset's GPT-NeoX (hidden 128, 4 layers) on the demo's 40
held-out documents, window 128 (`--model-dir` takes any saved model directory). It prints one
line per batch size and ends with `eval_speed_ratio=<lm-eval time / monolm time>` (the smallest
ratio over the batch sizes: the goal is >= 1 at every batch size) and `eval_max_rel_diff=<x>`, the
largest relative difference of a document's NLL between the two. Both sides run on one thread and
are timed in the process's CPU time, so a shared machine's other work stays out of the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _ensure_lm_eval() -> None:
    """Re-run this script under the scratch environment's interpreter when lm-eval is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        if os.environ.get("MONOLM_BENCH_REEXEC"):
            raise SystemExit("lm-eval is not importable in the scratch environment (.bench-env)") from None
        project_venv = Path(sys.prefix)
        scratch = subprocess.run(
            [str(ROOT / "bench" / "peers-env.sh"), str(project_venv)], check=True, capture_output=True, text=True
        ).stdout.strip()
        path = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
        env = {**os.environ, "MONOLM_BENCH_REEXEC": "1", "PYTHONPATH": path}
        os.execve(str(ROOT / scratch), [str(ROOT / scratch), *sys.argv], env)


def build(args: argparse.Namespace):
    """(model, tokenizer, texts): the tiny preset's model and the demo's held-out documents."""
    from monolm.config import load_config
    from monolm.data import splits as data_lib
    from monolm.models import loading as models

    cfg = load_config("tiny")
    splits = data_lib.load_splits(cfg.data, 42)
    held_out = getattr(splits, "test", None) or splits.eval  # the part stage 4 reports on
    texts = held_out[: args.docs]
    if args.model_dir:
        return models.load_model(args.model_dir), models.load_tokenizer(args.model_dir), texts
    tokenizer = data_lib.train_bpe_tokenizer(splits.train, cfg.model.tiny.vocab_size)
    return models.build_tiny_model(cfg.model.tiny, tokenizer, seed=0).eval(), tokenizer, texts


def lm_eval_side(model, tokenizer, texts, batch_size: int, seq_len: int):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=seq_len, device="cpu")
    requests = [
        Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=i) for i, t in enumerate(texts)
    ]

    def run():
        with contextlib.redirect_stderr(io.StringIO()):  # lm-eval's inner progress bar, once per batch
            return [-ll for ll in lm.loglikelihood_rolling(requests, disable_tqdm=True)]

    return run


def monolm_side(model, tokenizer, texts, batch_size: int, seq_len: int):
    from monolm.data import splits as data_lib
    from monolm.evaluation import perplexity as evaluation

    docs = data_lib.tokenize(tokenizer, texts)

    def run():
        out = evaluation.perplexity(
            model,
            docs,
            seq_len=seq_len,
            batch_size=batch_size,
            prefix_token_id=tokenizer.eos_token_id,
            texts=texts,
            device="cpu",
            progress=False,
            return_per_doc=True,
        )
        return [d["nll"] for d in out["per_doc"]]

    return run


def compare(model, tokenizer, texts, batch_size: int, args: argparse.Namespace) -> tuple[float, float]:
    """(lm-eval median / monolm median, largest relative per-document NLL difference) at one batch size."""
    sides = {
        "lm-eval": lm_eval_side(model, tokenizer, texts, batch_size, args.seq_len),
        "monolm": monolm_side(model, tokenizer, texts, batch_size, args.seq_len),
    }
    for fn in sides.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    results = {}
    for rep in range(args.repeats):
        for name in list(sides) if rep % 2 == 0 else list(sides)[::-1]:
            t0 = time.process_time()
            results[name] = sides[name]()
            times[name].append(time.process_time() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    pairs = list(zip(results["lm-eval"], results["monolm"], strict=True))
    diff = max(abs(a - b) / max(abs(a), 1e-12) for a, b in pairs)
    ratio = med["lm-eval"] / med["monolm"]
    print(
        f"batch {batch_size:>3}: lm-eval {med['lm-eval']:.3f} s, monolm {med['monolm']:.3f} s CPU "
        f"(ratio {ratio:.2f}); per-document NLLs agree to {diff:.1e} (relative) over {len(texts)} documents"
    )
    return ratio, diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--docs", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both sides)")
    parser.add_argument("--model-dir", help="a saved model directory instead of the tiny preset's model")
    args = parser.parse_args()
    _ensure_lm_eval()

    import logging

    import lm_eval
    import torch
    import transformers

    logging.getLogger("lm-eval").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    model, tokenizer, texts = build(args)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, lm-eval {lm_eval.__version__}, "
        f"{torch.get_num_threads()} thread(s); {len(texts)} documents, window {args.seq_len}"
    )
    ratios, diffs = [], []
    for batch_size in args.batch_sizes:
        ratio, diff = compare(model, tokenizer, texts, batch_size, args)
        ratios.append(ratio)
        diffs.append(diff)
    print(f"eval_speed_ratio={min(ratios):.2f}")
    print(f"eval_max_rel_diff={max(diffs):.1e}")


if __name__ == "__main__":
    main()
