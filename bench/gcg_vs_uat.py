"""GCG against UAT on the demo's trained baseline, under one threat model, at equal budgets.

Both attacks search a trigger of `trigger_len` tokens that raises the held-out loss; they differ
in how they spend candidate evaluations. For each trigger length and budget cap this script runs
UAT (`--sweeps` sweeps of `trigger_len` positions, `top_k + 1` candidates each: at most
`sweeps x trigger_len x (top_k + 1)` exactly scored candidate triggers per restart; it stops
early once a sweep changes nothing), GCG with as many steps of `search_width` candidates as that
cap allows (rounded up), and GCG's random control, all with the tiny preset's other settings
(texts, restarts, seed 42, `filter_ids` and ASCII-only tokens). It prints, per setting, each
attack's held-out absolute loss increase of the best restart (nats/token), the mean over
restarts, the optimisation-text increase, and the paired GCG − UAT difference over the held-out
texts (t interval and p, `monolm.stats.paired_test`).

Needs the demo's run folder (`make demo` first); finished restarts are reused from `--out`.

    .venv/bin/python bench/gcg_vs_uat.py [--lengths 3,5,8] [--sweeps 2,6] [--runs runs]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import torch

from monolm.attacks import gcg, uat
from monolm.attacks.stage import attack_texts
from monolm.config import load_config
from monolm.data import splits as data_lib
from monolm.models import loading as models
from monolm.stats import paired_test


def _shared(runs: Path, seed: int) -> Path:
    """The demo's shared folder for `seed` (stage 0 and the baseline arm)."""
    folder = runs / "tiny" / "tiny-neox" / "shared" / f"seed-{seed}"
    if not (folder / "train_baseline" / "manifest.json").exists():
        raise SystemExit(f"no finished baseline under {folder}; run `make demo` first")
    return folder


def _summary(res: dict) -> str:
    e, mean, opt = (
        res["eval"]["abs_increase"]["mean"],
        res["mean_over_restarts"]["eval"]["abs_increase"]["mean"],
        res["opt"],
    )
    return f"{e:+.4f} {mean:+.4f} {opt['attacked_loss'] - opt['clean_loss']:+.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=Path("runs"), help="the demo's runs folder")
    ap.add_argument("--lengths", default="3,5,8", help="trigger lengths, comma-separated")
    ap.add_argument("--sweeps", default="2,6", help="UAT sweeps setting each budget cap, comma-separated")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-gcg-vs-uat"), help="where the attacks' units go")
    args = ap.parse_args()
    logging.getLogger("monolm.attacks").setLevel(logging.WARNING)
    torch.manual_seed(0)

    shared = _shared(args.runs, args.seed)
    cfg = load_config("tiny")
    tok = models.load_tokenizer(shared / "setup" / "model")
    opt, held = attack_texts(cfg, tok, data_lib.load_saved_splits(shared / "setup" / "data").attack)
    model_dir = json.loads((shared / "train_baseline" / "manifest.json").read_text())["metrics"]["model_dir"]
    model = models.load_model(Path(model_dir), torch.device("cpu"))
    width = cfg.attacks.gcg.search_width
    print("columns per attack: held-out +nats/token of the best restart, mean over restarts, on the optimisation texts")
    head = f"{'len':>3} {'cap':>5} {'gcg steps':>9}  {'UAT':<23} {'GCG':<23} {'control':<23}"
    print(head + " GCG - UAT held-out (95% CI, p)")
    for length in (int(x) for x in args.lengths.split(",")):
        for sweeps in (int(x) for x in args.sweeps.split(",")):
            ucfg = cfg.attacks.uat.model_copy(update={"trigger_len": length, "max_sweeps": sweeps})
            cap = sweeps * length * (ucfg.top_k + 1)
            gcfg = cfg.attacks.gcg.model_copy(update={"trigger_len": length, "steps": math.ceil(cap / width)})
            tag = f"L{length}-s{sweeps}"
            u = uat.run(model, tok, opt, held, ucfg, seed=args.seed, out_dir=args.out / f"uat-{tag}", progress=False)
            g_opt = opt[: gcfg.n_opt_texts]
            g = gcg.run(model, tok, g_opt, held, gcfg, seed=args.seed, out_dir=args.out / f"gcg-{tag}")
            c = gcg.run(model, tok, g_opt, held, gcfg, seed=args.seed, out_dir=args.out / f"gcg-{tag}", control=True)
            test = paired_test(g["per_text"]["attacked"], u["per_text"]["attacked"])
            p = "n/a" if test["t_p"] is None else f"{test['t_p']:.2f}"
            print(
                f"{length:>3} {cap:>5} {gcfg.steps:>9}  {_summary(u):<23} {_summary(g):<23} {_summary(c):<23} "
                f"{test['mean_diff']:+.4f} [{test['ci_low']:+.4f}, {test['ci_high']:+.4f}], p {p}",
                flush=True,
            )
            print(f"{'':>20} triggers: UAT {u['trigger_text']!r}  GCG {g['trigger_text']!r}", flush=True)


if __name__ == "__main__":
    main()
