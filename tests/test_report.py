"""Stage 7 on synthetic stage folders with known numbers: statistics checked against hand
formulas, report sentences computed from the numbers, booktabs tables, valid PNGs, an atomic
results folder and transactional store rows."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import stage_dir
from PIL import Image

from monolm import report
from monolm.config import load_config
from monolm.core.artifacts import CorruptArtifact, write_manifest
from monolm.core.runtime import derive_seed
from monolm.report import stage as aggregate
from monolm.store import ResultsStore
from monolm.study.frame import StageRef

N_TEXTS = 40
T_975_DF2 = 4.302652729911275  # Student t quantile, 97.5%, 2 degrees of freedom (tables)

# Per-seed headline numbers: perplexity clearly higher for monotonic (consistent), UAT damage
# equal on average (null), HotFlip damage much larger for monotonic (consistent).
NUMBERS = {
    42: {
        "ppl": {"base": 40.0, "baseline": 20.0, "monotonic": 23.0},
        "uat": {"baseline": 0.30, "monotonic": 0.45},
        "hotflip": {"baseline": 0.20, "monotonic": 0.90},
        "control": {"baseline": 0.05, "monotonic": 0.08},
    },
    1337: {
        "ppl": {"base": 41.0, "baseline": 21.0, "monotonic": 24.5},
        "uat": {"baseline": 0.50, "monotonic": 0.35},
        "hotflip": {"baseline": 0.25, "monotonic": 0.95},
        "control": {"baseline": 0.06, "monotonic": 0.07},
    },
    2024: {
        "ppl": {"base": 39.5, "baseline": 22.5, "monotonic": 25.0},
        "uat": {"baseline": 0.40, "monotonic": 0.42},
        "hotflip": {"baseline": 0.22, "monotonic": 0.93},
        "control": {"baseline": 0.04, "monotonic": 0.09},
    },
}


def make_cfg(tmp_path: Path, seeds: list[int], **extra: Any):
    data = {
        "paths": {"runs_root": str(tmp_path / "runs"), "results_root": str(tmp_path / "results")},
        "seeds": seeds,
        "run_name": "synthetic-run",
        **extra,
    }
    return load_config("tiny", extra=data)


def _losses(
    seed: int, arm: str, tag: str, mean_increase: float, n: int = N_TEXTS, clean_mean: float = 4.0
) -> tuple[list[float], list[float]]:
    """Clean losses around `clean_mean` nats and attacked = clean + an increase whose mean is
    exactly `mean_increase` (noise centred to zero), so the stage metrics are known numbers."""
    rng = np.random.default_rng(derive_seed(seed, tag, arm))
    clean = clean_mean + 0.3 * rng.standard_normal(n)
    noise = 0.1 * rng.standard_normal(n)
    noise -= noise.mean()
    return clean.tolist(), (clean + mean_increase + noise).tolist()


def _stage(cfg, seed: int, stage: str, files: dict[str, Any], metrics: dict[str, Any], wall: float = 1.0) -> StageRef:
    directory = stage_dir(cfg, seed, stage)
    directory.mkdir(parents=True, exist_ok=True)
    for rel, obj in files.items():
        (directory / rel).write_text(json.dumps(obj))
    _, digest = write_manifest(
        directory, stage=stage, config={}, inputs={}, outputs=list(files), metrics=metrics, wall_time_s=wall
    )
    return StageRef(stage, seed, str(directory), digest, metrics)


def _history(arm: str, seed: int, final_ppl: float) -> dict[str, Any]:
    eff, seq = 16, 128
    log = [
        {
            "step": s,
            "train_loss": 3.0 + 2.0 * math.exp(-s / 20) + (0.1 if arm == "monotonic" else 0),
            "lr": 5e-4,
            "tokens_seen": s * eff * seq,
        }
        for s in range(5, 65, 5)
    ]
    evals = [
        {"step": s, "val_perplexity": final_ppl * (1 + 2.0 * math.exp(-s / 15)), "val_loss": 3.0} for s in (20, 40, 60)
    ]
    return {"log": log, "eval": evals, "summary": {"effective_batch_size": eff, "seq_len": seq, "seed": seed}}


MONOTONICITY = [
    {
        "target": "gpt_neox.layers.0.mlp.dense_h_to_4h",
        "role": "mlp_in",
        "sublayer": "linear",
        "n_pairs": 256,
        "n_coords": 256 * 512,
        "coord_violation_rate": 0.0,
        "pair_violation_rate": 0.0,
        "max_relative_drop": 0.0,
    },
    {
        "target": "gpt_neox.layers.0.mlp.dense_h_to_4h",
        "role": "mlp_in",
        "sublayer": "block",
        "n_pairs": 256,
        "n_coords": 256 * 128,
        "coord_violation_rate": 0.25,
        "pair_violation_rate": 1.0,
        "max_relative_drop": 0.4,
    },
    {
        "target": "gpt_neox.layers.1.mlp.dense_h_to_4h",
        "role": "mlp_in",
        "sublayer": "block",
        "n_pairs": 256,
        "n_coords": 256 * 128,
        "coord_violation_rate": 0.15,
        "pair_violation_rate": 0.5,
        "max_relative_drop": 0.2,
    },
]


def make_seed(cfg, seed: int, numbers: dict[str, Any], *, skip: tuple[str, ...] = ()) -> dict[str, StageRef]:
    """Fake stage folders (manifests written by monolm.core.artifacts) for one seed."""
    from monolm.attacks.effects import effect_summary
    from monolm.attacks.stage import normalize

    threshold = cfg.attacks.success_threshold
    refs: dict[str, StageRef] = {}
    contamination = {
        "ngram": 13,
        "action": "drop",
        "parts": {
            part: {"candidates": n + 1, "contaminated": 1, "contamination_rate": 1 / (n + 1), "kept": n}
            for part, n in (("validation", 4), ("test", 40), ("attack", 6))
        },
    }
    refs["setup"] = _stage(
        cfg,
        seed,
        "setup",
        {},
        {
            "model_dir": "/nowhere",
            "docs": {"train": 10, "validation": 4, "test": 40, "attack": 6},
            "contamination": contamination,
        },
    )
    refs["constrain"] = _stage(
        cfg,
        seed,
        "constrain",
        {
            "report.json": {
                "variant": "mlp_in",
                "init": "abs",
                "summary": {
                    "n_modules": 4,
                    "constrained_params": 262144,
                    "share_of_params": 0.3,
                    "frac_negative_before": 0.5,
                    "rel_change": 0.9,
                    "modules": [],
                },
                "drift": {"kl_mean": 0.8 + seed * 1e-5, "ppl_ratio": 2.1},
                "monotonicity": MONOTONICITY,
                "min_constrained_weight": 1e-6,
                "note": "n/a",
            }
        },
        {"drift": {}},
    )
    for arm in report.ARMS:
        ppl = numbers["ppl"][arm]
        refs[f"train_{arm}"] = _stage(
            cfg,
            seed,
            f"train_{arm}",
            {"history.json": _history(arm, seed, ppl)},
            {
                "arm": arm,
                "recipe": "fair",
                "lr": 5e-4,
                "steps": 60,
                "tokens_seen": 60 * 16 * 128,
                "effective_batch_size": 16,
                "final": {"train_loss": 3.1, "val_perplexity": ppl, "best_val_perplexity": ppl},
                "model_dir": "/nowhere",
            },
            wall=100.0 + (20 if arm == "monotonic" else 0),
        )
    models = {
        m: {"token_perplexity": p, "loss": math.log(p), "tokens": 5000, "docs": 40, "bits_per_byte": math.log2(p) / 4}
        for m, p in numbers["ppl"].items()
    }
    refs["evaluate"] = _stage(
        cfg,
        seed,
        "evaluate",
        {
            "evaluation.json": {
                "models": models,
                "part": "test",
                "n_docs": 40,
                "window": {"seq_len": 128, "prefix": "eos"},
                "recipe": "fair",
                "min_constrained_weight": 2e-6,
                "monotonicity": [dict(r, coord_violation_rate=r["coord_violation_rate"] * 0.8) for r in MONOTONICITY],
            }
        },
        {f"{m}_token_perplexity": p for m, p in numbers["ppl"].items()},
    )
    for attack in ("uat", "hotflip", "gcg"):  # GCG: twice UAT's damage, with HotFlip's control numbers
        per_example, per_model, control = {}, {}, {}
        increases = numbers.get(attack) or {arm: 2 * v for arm, v in numbers["uat"].items()}
        for arm in report.ARMS:
            clean, attacked = _losses(
                seed, arm, attack, increases[arm], clean_mean=numbers.get("clean", {}).get(arm, 4.0)
            )
            per_example[arm] = {"clean": clean, "attacked": attacked}
            per_model[arm] = normalize(effect_summary(clean, attacked, threshold=threshold, seed=seed))
            if attack in ("hotflip", "gcg"):
                c, a = _losses(seed, arm, "control", numbers["control"][arm])
                control[arm] = normalize(effect_summary(c, a, threshold=threshold, seed=seed))
        metrics: dict[str, Any] = {
            "per_model": per_model,
            "transfer": {
                "baseline": {"baseline": increases["baseline"], "monotonic": 0.1},
                "monotonic": {"baseline": 0.12, "monotonic": increases["monotonic"]},
            },
        }
        if attack == "hotflip":
            metrics.update(control=control, mean_flips={"baseline": 2.5, "monotonic": 2.9})
        if attack == "gcg":
            metrics.update(control=control)
        refs[attack] = _stage(cfg, seed, attack, {"per_example.json": per_example}, metrics)
    return {k: v for k, v in refs.items() if k not in skip}


@pytest.fixture(scope="module")
def three_seeds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("three")
    cfg = make_cfg(tmp, list(NUMBERS))
    seeds = [make_seed(cfg, s, n) for s, n in NUMBERS.items()]
    out = aggregate.run(cfg, seeds)
    return cfg, seeds, out, json.loads(Path(out["dir"], "results.json").read_text())


@pytest.fixture(scope="module")
def one_seed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one")
    cfg = make_cfg(tmp, [42])
    seeds = [make_seed(cfg, 42, NUMBERS[42])]
    out = aggregate.run(cfg, seeds)
    return cfg, seeds, out, json.loads(Path(out["dir"], "results.json").read_text())


def _summary(results, stage, model, metric):
    rec = report.summary(results, stage, model, metric)
    assert rec is not None, (stage, model, metric)
    return rec


def _comparison(results, stage, metric, scope="seeds", seed=None):
    found = [
        c
        for c in results["comparisons"]
        if c["stage"] == stage and c["metric"] == metric and c["scope"] == scope and c["seed"] == seed
    ]
    assert len(found) == 1, (stage, metric, scope, seed, found)
    return found[0]


# --------------------------------------------------------------------------- statistics, 3 seeds
def test_three_seed_summary_matches_hand_formulas(three_seeds):
    _, _, _, results = three_seeds
    values = [20.0, 21.0, 22.5]
    rec = _summary(results, "evaluate", "baseline", "token_perplexity")
    mean = sum(values) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    half = T_975_DF2 * std / math.sqrt(3)
    assert rec["n"] == 3 and rec["seeds"] == [42, 1337, 2024]
    assert rec["mean"] == pytest.approx(mean, rel=1e-12)
    assert rec["std"] == pytest.approx(std, rel=1e-12)
    assert (rec["ci_low"], rec["ci_high"]) == (
        pytest.approx(mean - half, rel=1e-9),
        pytest.approx(mean + half, rel=1e-9),
    )
    assert rec["ci_method"].startswith("t-interval over seeds")


def test_success_rate_interval_across_seeds_stays_within_zero_and_one():
    # three seeds with rates 0.0625, 0.8125, 0.0625: the t-interval (df=2, t=4.30) spans about
    # [-0.76, 1.39]; a rate's interval is clipped to [0, 1] and the method says so
    values = [
        {"stage": "hotflip", "model": "baseline", "metric": "success_rate", "seed": seed, "value": v}
        for seed, v in ((42, 0.0625), (1337, 0.8125), (2024, 0.0625))
    ]
    seeds = [{"seed": 42}, {"seed": 1337}, {"seed": 2024}]
    (rec,) = report.summarize_values(values, seeds)
    assert (rec["ci_low"], rec["ci_high"]) == (0.0, 1.0)
    assert rec["ci_method"] == "t-interval over seeds (n=3), clipped to [0, 1]"
    assert rec["mean"] == pytest.approx(0.3125)
    # a loss increase is not a rate: the same numbers keep their unclipped t-interval
    values = [dict(v, metric="abs_increase") for v in values]
    (rec,) = report.summarize_values(values, seeds)
    assert rec["ci_low"] < -0.7 and rec["ci_high"] > 1.3 and rec["ci_method"] == "t-interval over seeds (n=3)"


def test_success_rate_difference_interval_stays_within_minus_one_and_one():
    from monolm.report.comparisons import compare_arms

    mono = {42: 0.4375, 1337: 0.4375, 2024: 0.0}
    base = {42: 1.0, 1337: 0.0, 2024: 1.0}
    rates = {**{("monotonic", s): v for s, v in mono.items()}, **{("baseline", s): v for s, v in base.items()}}
    values = [
        {"stage": "hotflip", "model": arm, "metric": metric, "seed": seed, "value": v * scale}
        for (arm, seed), v in rates.items()
        for metric, scale in (("success_rate", 1.0), ("abs_increase", 10.0))
    ]
    seeds = [{"seed": 42}, {"seed": 1337}, {"seed": 2024}]
    comps = {(c.metric, c.scope): c.to_json() for c in compare_arms(values, seeds)}
    rate = comps[("success_rate", "seeds")]
    assert rate["mean_diff"] == pytest.approx(-0.375)
    assert (rate["ci_low"], rate["ci_high"]) == (-1.0, 1.0) and "two rates" in rate["ci_clipped"]
    loss = comps[("abs_increase", "seeds")]  # not a rate: unclipped, no note
    assert loss["ci_low"] < -10 and "ci_clipped" not in loss


def test_three_seed_paired_tests_match_hand_formulas(three_seeds):
    _, _, _, results = three_seeds
    comp = _comparison(results, "evaluate", "token_perplexity")
    diffs = [3.0, 3.5, 2.5]  # monotonic - baseline per seed
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    t = mean / (sd / math.sqrt(3))
    p = 1 - t / math.sqrt(2 + t * t)  # two-sided p of Student t with 2 df (closed form)
    assert comp["n"] == 3 and comp["mean_diff"] == pytest.approx(mean)
    assert comp["t_stat"] == pytest.approx(t, rel=1e-9)
    assert comp["t_p"] == pytest.approx(p, rel=1e-9)
    assert comp["wilcoxon_p"] == pytest.approx(0.25)  # exact: all 3 differences positive -> 2/2^3
    assert comp["significant"] is (p < 0.05)
    # the attack effect per seed is the exact mean increase we built in
    uat = _comparison(results, "uat", "abs_increase")
    d = np.array([0.45 - 0.30, 0.35 - 0.50, 0.42 - 0.40])
    t_uat = d.mean() / (d.std(ddof=1) / math.sqrt(3))
    assert uat["mean_diff"] == pytest.approx(d.mean(), abs=1e-9)
    assert uat["t_p"] == pytest.approx(1 - abs(t_uat) / math.sqrt(2 + t_uat**2), rel=1e-6)
    assert not uat["significant"]


def test_within_seed_tests_are_over_the_same_texts(three_seeds):
    _, seeds, _, results = three_seeds
    for refs in seeds:
        seed = refs["uat"].seed
        per_example = json.loads(Path(refs["hotflip"].dir, "per_example.json").read_text())
        d = np.subtract(per_example["monotonic"]["attacked"], per_example["monotonic"]["clean"]) - np.subtract(
            per_example["baseline"]["attacked"], per_example["baseline"]["clean"]
        )
        comp = _comparison(results, "hotflip", "abs_increase", scope="texts", seed=seed)
        t = d.mean() / (d.std(ddof=1) / math.sqrt(d.size))
        from scipy.stats import t as student_t

        assert comp["n"] == N_TEXTS
        assert comp["mean_diff"] == pytest.approx(d.mean())
        assert comp["t_p"] == pytest.approx(2 * student_t.sf(abs(t), d.size - 1), rel=1e-6)
        assert comp["significant"]


def test_report_sentences_follow_the_numbers(three_seeds):
    _, _, out, results = three_seeds
    md = Path(out["report"]).read_text()
    uat = next(s for s in results["findings"] if s.startswith("UAT absolute loss increase"))
    hotflip = next(s for s in results["findings"] if s.startswith("HotFlip absolute loss increase"))
    ppl = next(s for s in results["findings"] if s.startswith("Held-out token perplexity"))
    assert "no significant difference" in uat and "not significant at α=0.05" in uat and "n=3 seeds" in uat
    assert "paired t-test" in uat
    assert ": significant at α=0.05" in hotflip and "more damage to the constrained arm" in hotflip
    assert (
        "significant in 3 of 3 seeds (3 with the constrained arm higher, 0 lower)" in hotflip
    )  # the within-seed tests over texts
    # perplexity: consistent +3 but only 3 seeds -> whatever the t-test says, the words must match it
    comp = _comparison(results, "evaluate", "token_perplexity")
    assert ("not significant" in ppl) is (not comp["significant"])
    for sentence in (uat, hotflip, ppl):
        assert sentence in md
    # absolute first, relative second; honest wording; recipe stated prominently
    assert md.index("UAT absolute loss increase") < md.index("UAT relative loss increase")
    assert "non-negative FFN weights" in md and "is not described as monotone" in md
    assert "most robust" not in md and "monotone model" not in md.replace("not described as monotone", "")
    assert "Training recipe: **fair**" in md.split("## Findings")[0]
    assert results["meta"]["config_digest"] in md and "config.yaml" in md
    # violation rates pooled over targets: block (0.25*0.8 + 0.15*0.8)/2 = 0.16 after training
    rec = _summary(results, "evaluate", "monotonic", "monotonicity_mlp_in_block_coord_violation_rate")
    assert rec["mean"] == pytest.approx(0.16)
    assert "mlp in block: 16.0%" in md and "mlp in linear: 0%" in md  # 3 significant digits, as its column


def test_headline_table_opens_the_report_with_the_across_seed_tests(three_seeds):
    """The first screen: one row per measure with both arms, the across-seed difference, CI, p,
    verdict and n, all taken from the paired tests; the caveats stated once under it."""
    _, _, out, results = three_seeds
    md = Path(out["report"]).read_text()
    head = md.split("## What was run")[0]
    assert head.index("Headline") < head.index("| Measure |")
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
        for line in head.splitlines()
        if line.startswith("| ") and not line.startswith("| Measure")
    }
    assert list(rows) == [
        "Test loss (nats/token)",
        "UAT absolute loss increase (nats/token)",
        "HotFlip absolute loss increase (nats/token)",
        "GCG absolute loss increase (nats/token)",
        "UAT success rate (secondary)",
        "HotFlip success rate (secondary)",
        "GCG success rate (secondary)",
    ]
    from monolm.report import first_screen, formatting

    for label, (stage, metric) in zip(rows, first_screen.measures(), strict=True):
        comp = _comparison(results, stage, metric)
        cells = rows[label]
        fmt = formatting.fmt_pct if metric == "success_rate" else formatting.fmt_num
        assert (cells[1], cells[2]) == (fmt(comp["mean_b"]), fmt(comp["mean_a"]))
        p = formatting.fmt_p(comp["t_p"])
        if comp["role"] == "primary":  # Holm over the primary family first, the uncorrected p after it
            p = f"{formatting.fmt_p(comp['p_holm'])} (uncorrected {p})"
        assert cells[5] == p and cells[7] == "3 seeds"
        assert cells[6] == first_screen.verdict(stage, comp)
    loss = _comparison(results, "evaluate", "loss")
    assert float(rows["Test loss (nats/token)"][3]) == pytest.approx(loss["mean_diff"], rel=1e-3)
    assert "say nothing about variation between training seeds" not in md  # no within-seed row here
    assert "Holm-corrected over the 4 primary tests" in head and "secondary" in head  # test loss, UAT, HotFlip, GCG


def test_relative_without_absolute_difference_is_explained(tmp_path):
    """Same absolute damage, higher clean loss for the constrained arm: the relative increase is
    smaller only because it divides by a larger clean loss, and the report says so."""
    cfg = make_cfg(tmp_path, [42])
    numbers = {**NUMBERS[42], "uat": {"baseline": 0.4, "monotonic": 0.4}, "clean": {"baseline": 3.0, "monotonic": 6.0}}
    out = aggregate.run(cfg, [make_seed(cfg, 42, numbers)])
    results = json.loads(Path(out["dir"], "results.json").read_text())
    assert not _comparison(results, "uat", "abs_increase", scope="texts", seed=42)["significant"]
    assert _comparison(results, "uat", "rel_increase", scope="texts", seed=42)["significant"]
    note = next(s for s in results["findings"] if s.startswith("UAT: the relative loss increase differs"))
    assert "higher for the monotonic arm" in note and "the absolute increase is the primary measure" in note


def test_recipe_statement_names_asymmetric_arms(tmp_path):
    cfg = make_cfg(tmp_path, [42], training={"recipe": "asymmetric", "monotonic": {"lr": 1e-3}})
    meta = {"recipe": "asymmetric", "arms": {a: cfg.training.arm(a).model_dump(mode="json") for a in report.ARMS}}
    text = report.recipe_statement(meta, [])
    assert "**asymmetric**" in text and "lr: baseline 0.0005 vs monotonic 0.001" in text
    assert "may come from the recipe" in text


def test_tables_and_csv(three_seeds):
    _, _, out, results = three_seeds
    tex = Path(out["dir"], "tables.tex").read_text()
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert tex.count(rule) == tex.count(r"\begin{tabular}") > 3
    assert "n = 3 seeds" in tex and r"$\pm$" in tex and "nats/token" in tex
    assert "_" not in tex.replace(r"\_", "")  # every underscore escaped
    csv_text = Path(out["dir"], "summary.csv").read_text().splitlines()
    header = csv_text[0].split(",")
    assert header[:4] == ["stage", "model", "metric", "n"]
    row = next(line for line in csv_text if line.startswith("evaluate,monotonic,token_perplexity,"))
    assert row.split(",")[3] == "3" and float(row.split(",")[4]) == pytest.approx((23 + 24.5 + 25) / 3)
    # the terminal / artifact table: readable labels with units, the arm column called arm, rates in %
    assert out["table"][1]["arm"] == "baseline" and out["table"][1]["test perplexity"] == pytest.approx(21.1666666)
    assert out["table"][2]["HotFlip damage (nats/token)"] == pytest.approx(0.9266666, rel=1e-5)
    rate = next(
        s
        for s in results["summaries"]
        if s["stage"] == "hotflip" and s["model"] == "monotonic" and s["metric"] == "success_rate"
    )["mean"]
    assert out["table"][2]["HotFlip success (%)"] == pytest.approx(100 * rate)
    # the answer in one sentence: report.md opens with it, and the stage result carries it
    assert out["answer"].startswith("The constraint cost +") and "HotFlip constrained less robust" in out["answer"]
    assert "p=" in out["answer"] and "paired t over 3 seeds" in out["answer"]
    lines = Path(out["report"]).read_text().splitlines()
    assert lines[2] == f"**{out['answer']}**"


def test_every_value_carries_its_provenance(three_seeds):
    cfg, _, out, results = three_seeds
    for rec in results["values"] + results["summaries"] + results["comparisons"]:
        assert rec["variant"] == "mlp_in" and rec["preset"] == "tiny" and rec["recipe"] == "fair"
        assert rec["config_digest"] == cfg.digest() and rec["code_revision"]
    assert all("seed" in v and "model" in v for v in results["values"])
    assert out["digest"] == __import__("hashlib").sha256(Path(out["dir"], "results.json").read_bytes()).hexdigest()


def test_plots_are_valid_images(three_seeds):
    _, _, out, _ = three_seeds
    for name in ("perplexity.png", "attacks.png", "training.png"):
        path = Path(out["dir"], name)
        assert str(path) in out["files"]
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size[0] > 600 and img.size[1] > 400
    assert sorted(Path(f).name for f in out["files"]) == sorted(
        [
            "attacks.png",
            "config.yaml",
            "manifest.json",
            "perplexity.png",
            "report.md",
            "results.json",
            "summary.csv",
            "tables.tex",
            "training.png",
        ]
    )
    assert all(Path(f).is_file() for f in out["files"])


def test_store_rows(three_seeds):
    cfg, _, out, results = three_seeds
    with ResultsStore(cfg.store_url) as store:
        run = store.get_run(out["run_id"])
        assert run["status"] == "completed" and run["seeds"] == [42, 1337, 2024] and run["recipe"] == "fair"
        assert run["config_digest"] == cfg.digest() and run["variant"] == "mlp_in" and run["preset"] == "tiny"
        rows = store.query(run_id=out["run_id"], arm="monotonic", metric="token_perplexity")
        assert sorted((r["seed"], r["value"]) for r in rows) == [(42, 23.0), (1337, 24.5), (2024, 25.0)]
        assert all(r["stage"] == "evaluate" and r["recipe"] == "fair" for r in rows)
        mean = store.query(run_id=out["run_id"], arm="monotonic", metric="token_perplexity:mean")
        assert len(mean) == 1 and mean[0]["seed"] is None and mean[0]["value"] == pytest.approx(24.1666666)
        test = store.query(run_id=out["run_id"], arm="monotonic-baseline", metric="abs_increase:t_p", stage="uat")
        assert {r["seed"] for r in test} == {None, 42, 1337, 2024}
        assert len(store.query(run_id=out["run_id"])) == len(aggregate.store_rows(results))


def test_rerun_is_idempotent(three_seeds):
    cfg, seeds, out, _ = three_seeds
    again = aggregate.run(cfg, seeds)
    assert again["digest"] == out["digest"]  # results.json is byte-identical
    with ResultsStore(cfg.store_url) as store:
        assert len(store.runs()) == 1


# --------------------------------------------------------------------------- one seed
def test_one_seed_uses_examples(one_seed):
    _, seeds, out, results = one_seed
    rec = _summary(results, "uat", "monotonic", "abs_increase")
    per_example = json.loads(Path(seeds[0]["uat"].dir, "per_example.json").read_text())["monotonic"]
    d = np.subtract(per_example["attacked"], per_example["clean"])
    assert rec["n"] == 1 and rec["std"] is None and rec["n_examples"] == N_TEXTS
    assert rec["ci_method"].startswith("bootstrap BCa over texts")
    half_normal = 1.96 * d.std(ddof=1) / math.sqrt(d.size)  # the bootstrap should be close to it
    assert rec["ci_low"] < d.mean() < rec["ci_high"]
    assert (rec["ci_high"] - rec["ci_low"]) / 2 == pytest.approx(half_normal, rel=0.25)
    assert not [c for c in results["comparisons"] if c["scope"] == "seeds"]  # no across-seed test with n=1
    uat = next(s for s in results["findings"] if s.startswith("UAT absolute loss increase"))
    assert "n=40 texts" in uat and "(seed 42)" in uat
    ppl = next(s for s in results["findings"] if s.startswith("Held-out loss"))
    assert "no paired test possible" in ppl and "no difference is claimed" in ppl and "n=1 seed)" in ppl
    md = Path(out["report"]).read_text()
    assert "No confidence interval" in md  # perplexity: no per-document losses
    # The caveat the within-seed tests share is said once, under the headline table, not per finding.
    assert md.count("say nothing about variation between training seeds") == 1
    head = md.split("## What was run")[0]
    assert "say nothing about variation between training seeds" in head
    row = next(line for line in head.splitlines() if line.startswith("| UAT absolute loss increase"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    uat_test = next(c for c in results["comparisons"] if c["stage"] == "uat" and c["metric"] == "abs_increase")
    assert float(cells[3]) == pytest.approx(uat_test["mean_diff"], rel=1e-3) and cells[7] == "40 texts (seed 42)"
    assert cells[6] == "constrained less robust"  # significant, constrained − baseline > 0


def test_one_seed_perplexity_ci_from_documents(tmp_path):
    cfg = make_cfg(tmp_path, [7])
    refs = make_seed(cfg, 7, NUMBERS[42], skip=("uat", "hotflip", "gcg"))
    ev_dir = Path(refs["evaluate"].dir)
    evaluation = json.loads((ev_dir / "evaluation.json").read_text())
    rng = np.random.default_rng(0)
    tokens = rng.integers(50, 200, 30)
    difficulty = 0.3 * rng.standard_normal(30)  # the same documents for every model
    for model in ("base", "baseline", "monotonic"):
        nll = tokens * (math.log(NUMBERS[42]["ppl"][model]) + difficulty + 0.02 * rng.standard_normal(30))
        evaluation["models"][model]["per_doc"] = [
            {"nll": float(a), "tokens": int(b)} for a, b in zip(nll, tokens, strict=True)
        ]
        evaluation["models"][model]["token_perplexity"] = math.exp(nll.sum() / tokens.sum())
    refs["evaluate"] = _stage(cfg, 7, "evaluate", {"evaluation.json": evaluation}, {})
    out = aggregate.run(cfg, [refs])
    results = json.loads(Path(out["dir"], "results.json").read_text())
    rec = _summary(results, "evaluate", "monotonic", "token_perplexity")
    assert rec["ci_method"].startswith("bootstrap BCa over documents") and rec["ci_low"] < rec["mean"] < rec["ci_high"]
    comp = _comparison(results, "evaluate", "doc_loss", scope="documents", seed=7)
    assert comp["n"] == 30 and comp["significant"]
    assert results["meta"]["status"] == "partial"  # no attack stages
    assert "**Status: partial** — seed 7 lacks uat, hotflip, gcg" in Path(out["report"]).read_text()


def test_attacks_missing_in_one_seed_are_tested_within_the_other(tmp_path):
    """Two seeds, attacks only in one: no n=1 'across seeds' test, the within-seed test instead."""
    cfg = make_cfg(tmp_path, [42, 1337])
    seeds = [make_seed(cfg, 42, NUMBERS[42]), make_seed(cfg, 1337, NUMBERS[1337], skip=("uat", "hotflip", "gcg"))]
    out = aggregate.run(cfg, seeds)
    results = json.loads(Path(out["dir"], "results.json").read_text())
    # two seeds with quality: no across-seed test either (it would have 1 degree of freedom)
    assert [c["metric"] for c in results["comparisons"] if c["scope"] == "seeds"] == []
    assert results["findings"][0].startswith("2 seeds: no across-seed test or interval")
    hotflip = next(s for s in results["findings"] if s.startswith("HotFlip absolute loss increase"))
    assert "n=40 texts" in hotflip and "(seed 42)" in hotflip  # the only seed with this measurement
    assert results["meta"]["status"] == "partial" and out["status"] == "partial"


# --------------------------------------------------------------------------- refusing bad inputs
def test_corrupt_input_is_refused_with_its_path(tmp_path):
    cfg = make_cfg(tmp_path, [42])
    refs = make_seed(cfg, 42, NUMBERS[42])
    path = Path(refs["evaluate"].dir, "evaluation.json")
    path.write_text(path.read_text().replace("23.0", "13.0"))
    with pytest.raises(CorruptArtifact, match=re.escape(str(path))):
        aggregate.run(cfg, [refs])
    assert not (tmp_path / "results" / "synthetic-run").exists()


def test_missing_or_replaced_manifest_is_refused(tmp_path):
    cfg = make_cfg(tmp_path, [42])
    refs = make_seed(cfg, 42, NUMBERS[42])
    stale = refs["uat"]
    refs = make_seed(cfg, 42, {**NUMBERS[42], "uat": {"baseline": 0.1, "monotonic": 0.1}})  # re-ran after the ref
    with pytest.raises(
        CorruptArtifact,
        match=re.escape(str(Path(stale.dir, "manifest.json"))) + ".*differs from the digest the pipeline passed",
    ):
        aggregate.run(cfg, [{**refs, "uat": stale}])
    Path(refs["hotflip"].dir, "manifest.json").unlink()
    with pytest.raises(
        CorruptArtifact, match=re.escape(str(Path(refs["hotflip"].dir, "manifest.json"))) + ".*did not finish"
    ):
        aggregate.read_seed(refs)


def test_per_example_must_match_the_stage_summary(tmp_path):
    cfg = make_cfg(tmp_path, [42])
    refs = make_seed(cfg, 42, NUMBERS[42])
    per_example = json.loads(Path(refs["uat"].dir, "per_example.json").read_text())
    per_example["monotonic"]["attacked"] = per_example["monotonic"]["attacked"][:-1]
    per_example["monotonic"]["clean"] = per_example["monotonic"]["clean"][:-1]
    refs["uat"] = _stage(cfg, 42, "uat", {"per_example.json": per_example}, refs["uat"].metrics)
    with pytest.raises(CorruptArtifact, match="39 texts, but the stage reports n=40"):
        aggregate.run(cfg, [refs])


# --------------------------------------------------------------------------- all or nothing
def _no_leftovers(root: Path) -> bool:
    return not [p for p in root.glob(".*") if p.name.startswith((".tmp-", ".old-"))]


def test_failure_midway_leaves_no_folder_and_no_rows(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, [42])
    refs = make_seed(cfg, 42, NUMBERS[42])
    written: list[Path] = []
    real = aggregate.plots.plot_attacks

    def fail_after_attacks(results, path):  # perplexity.png and attacks.png exist, then a crash
        written.append(real(results, path))
        raise RuntimeError("disk full while plotting")

    monkeypatch.setattr(aggregate.plots, "plot_attacks", fail_after_attacks)
    with pytest.raises(RuntimeError, match="disk full"):
        aggregate.run(cfg, [refs])
    assert written and not written[0].exists()  # the temp folder is gone
    root = tmp_path / "results"
    assert not (root / "synthetic-run").exists() and _no_leftovers(root)
    with ResultsStore(cfg.store_url) as store:
        assert store.runs() == [] and store.query() == []


def test_failed_store_write_keeps_the_previous_results_and_rows(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, [42])
    refs = make_seed(cfg, 42, NUMBERS[42])
    first = aggregate.run(cfg, [refs])
    before = {f: Path(f).read_bytes() for f in first["files"]}
    with ResultsStore(cfg.store_url) as store:
        rows_before = store.query(run_id=first["run_id"])

    def boom(self, run, metrics):
        list(metrics)
        raise OSError("database went away")

    monkeypatch.setattr(ResultsStore, "record_run", boom)
    with pytest.raises(OSError, match="database went away"):
        aggregate.run(cfg, [refs])
    assert {f: Path(f).read_bytes() for f in first["files"]} == before  # the previous folder, restored
    assert _no_leftovers(tmp_path / "results")
    with ResultsStore(cfg.store_url) as store:
        assert store.query(run_id=first["run_id"]) == rows_before


def test_failed_store_write_on_a_first_run_leaves_nothing(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, [42])
    refs = make_seed(cfg, 42, NUMBERS[42])
    monkeypatch.setattr(ResultsStore, "record_run", lambda self, run, metrics: (_ for _ in ()).throw(OSError("no db")))
    with pytest.raises(OSError, match="no db"):
        aggregate.run(cfg, [refs])
    assert not (tmp_path / "results" / "synthetic-run").exists() and _no_leftovers(tmp_path / "results")


def test_published_replaces_an_existing_folder(tmp_path):
    final, tmp = tmp_path / "run", tmp_path / ".tmp-run-x"
    final.mkdir()
    (final / "old.txt").write_text("old")
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    with aggregate.published(tmp, final):
        assert (final / "new.txt").is_file()
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"] and not tmp.exists()
    assert _no_leftovers(tmp_path)


def test_bad_run_name_and_duplicate_seeds_are_refused(tmp_path):
    cfg = make_cfg(tmp_path, [42])
    refs = make_seed(cfg, 42, NUMBERS[42])
    with pytest.raises(ValueError, match="more than once"):
        aggregate.run(cfg, [refs, refs])
    with pytest.raises(ValueError, match="run_name: not a folder name"):
        aggregate.run(cfg.model_copy(update={"run_name": "../escape"}), [refs])


# --------------------------------------------------------------------------- held-out parts and honest notes
def test_numbers_say_which_part_they_come_from(one_seed):
    _, _, out, results = one_seed
    parts = {(v["stage"], v["metric"]): v["part"] for v in results["values"]}
    assert parts[("evaluate", "token_perplexity")] == "test"
    assert parts[("uat", "abs_increase")] == "attack" and parts[("hotflip", "abs_increase")] == "attack"
    assert parts[("train_baseline", "final_val_perplexity")] == "validation"
    assert parts[("train_baseline", "tokens_seen")] == "train" and parts[("train_baseline", "lr")] is None
    assert all(s["part"] == "test" for s in results["summaries"] if s["stage"] == "evaluate" and s["model"] == "base")
    assert {c["part"] for c in results["comparisons"] if c["stage"] in ("uat", "hotflip")} == {"attack"}
    assert results["held_out"]["seeds"]["42"]["docs"]["validation"] == 4
    md = Path(out["report"]).read_text()
    head = md.split("## Findings")[0]
    assert "validation 4 (checkpoint selection and training curves), test 40 (reported quality)" in head
    assert "dropped candidates: validation 1 of 5 (20.0%); test 1 of 41" in head
    quality = md.split("**Held-out quality on the test part")[1].split("## ")[0]
    assert "Test part: 40 documents per seed" in quality
    assert "rolling windows of 128 tokens with disjoint predicted spans, EOS prefix" in quality
    assert "lm-eval `loglikelihood_rolling` with `max_length=128`" in quality
    assert "Validation perplexity is measured on the validation part, which selected best/" in md


def test_wilcoxon_floor_note_only_where_it_applies(one_seed, three_seeds):
    one = Path(one_seed[2]["report"]).read_text()
    three = Path(three_seeds[2]["report"]).read_text()
    assert "n = 5 seeds" not in one and "cannot be below" not in one  # tests over texts, not seeds
    assert "With n = 3 seeds the exact two-sided Wilcoxon p-value cannot be below 0.25" in three
    assert "n = 5 seeds" not in three


def test_recipe_line_states_the_decay_policy(tmp_path, one_seed):
    md = Path(one_seed[2]["report"]).read_text()
    assert "Weight decay: AdamW, 0.01 on weight matrices and embeddings in both arms, none on biases" in md
    assert "were not decayed (decaying V would pull W towards ln 2, not 0)" in md
    cfg = make_cfg(tmp_path, [42], training={"common": {"constrained_weight_decay": "materialized"}})
    meta = {"recipe": "fair", "arms": {a: cfg.training.arm(a).model_dump(mode="json") for a in report.ARMS}}
    assert "decayed as W itself" in report.recipe_statement(meta, [])


def test_monotonicity_words_follow_the_measured_rates(tmp_path, one_seed):
    md = Path(one_seed[2]["report"]).read_text()
    assert "mlp in block: 16.0% (violations in 75.0% of 512 sampled input pairs: not monotone)" in md
    assert "mlp in linear: 0% (no violation in 256 sampled input pairs)" in md
    clean = [dict(r, coord_violation_rate=0.0, pair_violation_rate=0.0) for r in MONOTONICITY]
    results = {
        "summaries": [
            {"stage": "evaluate", "model": "monotonic", "metric": metric, "mean": value, "n": 1}
            for metric, value in report.monotonicity_rates(clean).items()
        ]
    }
    text = report.monotonicity_statement(results)
    assert "mlp in block: 0% (no violation in 512 sampled input pairs)" in text
    assert "not monotone" not in text and "is not claimed to be monotone" in text
