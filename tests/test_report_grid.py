"""The cross-variant report (stage 7 of a grid run) on synthetic cells with known numbers: three
constraint variants over three seeds whose baselines are identical per seed (as the shared
baseline stages make them), checked against hand formulas: the table's numbers, the Holm-adjusted
p-values, the Pareto sets, findings that follow the numbers when the variants swap, the renderers,
valid and deterministic figures, and a one-seed grid tested within its seed."""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

import numpy as np
import pytest
from PIL import Image

from monolm import report, stats
from monolm.attacks.effects import effect_summary
from monolm.attacks.stage import normalize
from monolm.core.runtime import derive_seed
from monolm.report.cross_cell import figures as plots_grid

SEEDS = (42, 1337, 2024)
N_TEXTS = 40
N_DOCS = 40
THRESHOLD = 0.15
MODEL = "tiny-neox"

# The baseline of each seed: test loss (nats/token) and each attack's absolute loss increase.
BASELINE = {
    "loss": {42: 3.00, 1337: 3.10, 2024: 2.95},
    "uat": {42: 0.40, 1337: 0.50, 2024: 0.45},
    "hotflip": {42: 0.20, 1337: 0.25, 2024: 0.22},
}
# Per variant and seed (in SEEDS order): Δ test loss (constrained − baseline) and the constrained
# arm's absolute loss increase under each attack.
VARIANTS = {
    "mlp_in": {"dloss": (0.05, 0.07, 0.06), "uat": (0.38, 0.49, 0.44), "hotflip": (0.12, 0.16, 0.15)},
    "mlp_both": {"dloss": (0.20, 0.25, 0.15), "uat": (0.20, 0.28, 0.25), "hotflip": (0.05, 0.07, 0.06)},
    "mlp_in_attn_out": {"dloss": (0.10, 0.12, 0.11), "uat": (0.30, 0.44, 0.33), "hotflip": (0.17, 0.22, 0.20)},
}
ATTACKS = ("uat", "hotflip")


# --------------------------------------------------------------------------- synthetic cells
def _centred(rng: np.random.Generator, scale: float, n: int) -> np.ndarray:
    noise = scale * rng.standard_normal(n)
    return noise - noise.mean()


def _attack_losses(tag: str, seed: int, increase: float) -> tuple[list[float], list[float]]:
    """Clean losses around 2.5 nats and attacked = clean + a per-text increase whose mean is exactly
    `increase`; the clean losses depend on the seed only, so both arms are attacked on the same texts."""
    clean = 2.5 + 0.3 * np.random.default_rng(derive_seed(seed, "grid-clean")).standard_normal(N_TEXTS)
    attacked = clean + increase + _centred(np.random.default_rng(derive_seed(seed, "grid", tag)), 0.05, N_TEXTS)
    return clean.tolist(), attacked.tolist()


def _doc_losses(tag: str, seed: int, loss: float) -> list[dict[str, float]]:
    """Per-document losses of equal length (100 tokens) whose token-weighted mean is exactly `loss`."""
    base = 0.2 * np.random.default_rng(derive_seed(seed, "grid-docs")).standard_normal(N_DOCS)
    per_doc = (
        loss + base - base.mean() + _centred(np.random.default_rng(derive_seed(seed, "grid-doc", tag)), 0.02, N_DOCS)
    )
    return [{"nll": 100.0 * x, "tokens": 100.0} for x in per_doc]


def _seed_data(variant: dict[str, Any], name: str, seed: int) -> dict[str, Any]:
    """One seed of one cell as the `SeedData` dict `monolm.report.analyze` reads (no files)."""
    i = SEEDS.index(seed)
    losses = {"baseline": BASELINE["loss"][seed], "monotonic": BASELINE["loss"][seed] + variant["dloss"][i]}
    tags = {"baseline": "baseline", "monotonic": f"{name}-monotonic"}
    models = {
        arm: {
            "token_perplexity": math.exp(loss),
            "loss": loss,
            "tokens": 100 * N_DOCS,
            "docs": N_DOCS,
            "per_doc": _doc_losses(tags[arm], seed, loss),
        }
        for arm, loss in losses.items()
    }
    stages: dict[str, Any] = {"evaluate": {"metrics": {}, "wall_time_s": 1.0}}
    per_example: dict[str, Any] = {}
    for attack in ATTACKS:
        increases = {"baseline": BASELINE[attack][seed], "monotonic": variant[attack][i]}
        per_example[attack], per_model = {}, {}
        for arm, increase in increases.items():
            clean, attacked = _attack_losses(f"{attack}-{tags[arm]}", seed, increase)
            per_example[attack][arm] = {"clean": clean, "attacked": attacked}
            per_model[arm] = normalize(effect_summary(clean, attacked, threshold=THRESHOLD, seed=seed))
        stages[attack] = {"metrics": {"per_model": per_model}, "wall_time_s": 1.0}
    return {
        "seed": seed,
        "stages": stages,
        "constrain": None,
        "evaluation": {"models": models, "part": "test", "n_docs": N_DOCS},
        "histories": {},
        "per_example": per_example,
    }


def make_cell(name: str, numbers: dict[str, Any], seeds: tuple[int, ...], model: str = MODEL) -> dict[str, Any]:
    meta = {
        "run_name": f"grid-{model}-{name}",
        "run_id": f"grid-{model}-{name}-0",
        "preset": "tiny",
        "model": model,
        "variant": name,
        "init": "abs",
        "recipe": "fair",
        "arms": {},
        "config_digest": "0" * 16,
        "code_revision": "test",
        "seeds": list(seeds),
        "success_threshold": THRESHOLD,
    }
    results = report.analyze([_seed_data(numbers, name, s) for s in seeds], meta)
    results = json.loads(json.dumps(results))  # as read back from results.json
    return {"model": model, "parameters": None, "variant": name, "init": "abs", "results": results}


@pytest.fixture(scope="module")
def cells() -> list[dict[str, Any]]:
    return [make_cell(name, numbers, SEEDS) for name, numbers in VARIANTS.items()]


@pytest.fixture(scope="module")
def grid(cells) -> dict[str, Any]:
    return report.grid_analysis(cells)


def _row(grid: dict[str, Any], variant: str, model: str = MODEL) -> dict[str, Any]:
    entry = next(m for m in grid["models"] if m["model"] == model)
    return next(r for r in entry["rows"] if r["variant"] == variant)


def _t_interval(values: Any) -> tuple[float, float, float]:
    """mean and Student-t 95% interval (n = 3) by hand."""
    v = np.asarray(values, dtype=float)
    half = T_975_DF2 * v.std(ddof=1) / math.sqrt(v.size)
    return v.mean(), v.mean() - half, v.mean() + half


def _t_p(diffs: Any) -> float:
    """Two-sided p of the paired t-test with 2 degrees of freedom (closed form)."""
    d = np.asarray(diffs, dtype=float)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(d.size))
    return 1 - abs(t) / math.sqrt(2 + t * t)


def _holm_by_hand(p: list[float]) -> list[float]:
    """Sort ascending, multiply by m, m − 1, …, 1, carry the running maximum, cap at 1."""
    order = sorted(range(len(p)), key=lambda i: p[i])
    out, running = [0.0] * len(p), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        out[i] = running
    return out


def _assert_estimate(est: dict[str, Any], mean: float, low: float, high: float, n: int = 3, unit: str = "seeds"):
    assert est["value"] == pytest.approx(mean, abs=1e-9)
    assert (est["ci_low"], est["ci_high"]) == (pytest.approx(low, abs=1e-9), pytest.approx(high, abs=1e-9))
    assert (est["n"], est["unit"]) == (n, unit)


T_975_DF2 = 4.302652729911275  # Student t quantile, 97.5%, 2 degrees of freedom (tables)


# --------------------------------------------------------------------------- Holm
def test_holm_matches_hand_computation_and_reference_values():
    # hand: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.06
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # R: p.adjust(c(0.01, 0.02, 0.03, 0.04, 0.05), "holm") = 0.05 0.08 0.09 0.09 0.09
    assert stats.holm([0.01, 0.02, 0.03, 0.04, 0.05]) == pytest.approx([0.05, 0.08, 0.09, 0.09, 0.09])
    # R: p.adjust(c(0.02, 0.02, 0.5), "holm") = 0.06 0.06 0.5 (ties)
    assert stats.holm([0.02, 0.02, 0.5]) == pytest.approx([0.06, 0.06, 0.5])
    assert stats.holm([0.6, 0.7]) == [1.0, 1.0]  # capped at 1
    assert stats.holm([0.04]) == [0.04]  # one test: unchanged
    # None is not a hypothesis: m = 2 here, and the Nones stay in place
    assert stats.holm([None, 0.02, None, 0.01]) == [None, pytest.approx(0.02), None, pytest.approx(0.02)]
    assert stats.holm([]) == [] and stats.holm([None]) == [None]
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="position 1"):
            stats.holm([0.1, bad])


# --------------------------------------------------------------------------- the table's numbers
def test_quality_cost_matches_hand_formulas(grid):
    for name, numbers in VARIANTS.items():
        quality = _row(grid, name)["quality"]
        mean, low, high = _t_interval(numbers["dloss"])
        _assert_estimate(quality["delta_loss"], mean, low, high)
        _assert_estimate(quality["perplexity_ratio"], math.exp(mean), math.exp(low), math.exp(high))
        per_seed = {p["seed"]: p["value"] for p in quality["delta_loss"]["per_seed"]}
        assert per_seed == {s: pytest.approx(d, abs=1e-12) for s, d in zip(SEEDS, numbers["dloss"], strict=True)}
        base_ppl = [math.exp(BASELINE["loss"][s]) for s in SEEDS]
        _assert_estimate(quality["baseline_perplexity"], *_t_interval(base_ppl))


def _success(attack: str, tag: str, seed: int, increase: float) -> float:
    clean, attacked = map(np.asarray, _attack_losses(f"{attack}-{tag}", seed, increase))
    return float(np.mean((attacked - clean) / clean > THRESHOLD))


def test_robustness_matches_hand_formulas(grid):
    for name, numbers in VARIANTS.items():
        row = _row(grid, name)
        for attack in ATTACKS:
            block = row["attacks"][attack]
            mono = np.array(numbers[attack])
            base = np.array([BASELINE[attack][s] for s in SEEDS])
            _assert_estimate(block["constrained_abs_increase"], *_t_interval(mono))
            _assert_estimate(block["baseline_abs_increase"], *_t_interval(base))
            _assert_estimate(block["difference"], *_t_interval(mono - base))
            mean, low, high = _t_interval(base - mono)
            _assert_estimate(block["gain"], mean, low, high)
            assert block["difference"]["t_p"] == pytest.approx(_t_p(mono - base), rel=1e-9)
            success = [_success(attack, f"{name}-monotonic", s, numbers[attack][i]) for i, s in enumerate(SEEDS)]
            assert attack != "uat" or 0 < np.mean(success) < 1  # a rate that is neither 0 nor 1 somewhere
            mean, low, high = _t_interval(success)  # a rate's interval is clipped to [0, 1]
            _assert_estimate(block["constrained_success_rate"], mean, max(low, 0.0), min(high, 1.0))
            per_seed = {p["seed"]: p["value"] for p in block["gain"]["per_seed"]}
            assert per_seed == {s: pytest.approx(g, abs=1e-12) for s, g in zip(SEEDS, base - mono, strict=True)}


def test_holm_adjusted_p_against_hand_values(grid, cells):
    families = {"quality": lambda n: np.array(n["dloss"])}
    families |= {a: (lambda n, a=a: np.array(n[a]) - np.array([BASELINE[a][s] for s in SEEDS])) for a in ATTACKS}
    for family, diffs in families.items():
        p = [_t_p(diffs(numbers)) for numbers in VARIANTS.values()]
        expected = _holm_by_hand(p)
        for (name, _), p_raw, p_adj in zip(VARIANTS.items(), p, expected, strict=True):
            row = _row(grid, name)
            test = row["quality"]["delta_loss"] if family == "quality" else row["attacks"][family]["difference"]
            assert test["t_p"] == pytest.approx(p_raw, rel=1e-9)
            assert test["p_holm"] == pytest.approx(p_adj, rel=1e-9) and test["holm_m"] == 3
            assert test["significant_holm"] is bool(p_adj < 0.05)
    # the hand numbers: UAT's mlp_in_attn_out is significant before the correction only
    uat = _row(grid, "mlp_in_attn_out")["attacks"]["uat"]["difference"]
    assert uat["significant"] and not uat["significant_holm"]
    assert uat["p_holm"] == pytest.approx(
        max(2 * uat["t_p"], _t_p(np.array(VARIANTS["mlp_in"]["uat"]) - [0.40, 0.50, 0.45]))
    )
    # the uncorrected p is the cell's own, unchanged in its results.json; the cell's Holm is over its
    # own primary tests (quality and each attack), not over the grid's variants
    for cell in cells:
        comp = next(c for c in cell["results"]["comparisons"] if c["stage"] == "uat" and c["metric"] == "abs_increase")
        assert comp["role"] == "primary" and comp["holm_m"] == 1 + len(ATTACKS)
        assert _row(grid, cell["variant"])["attacks"]["uat"]["difference"]["t_p"] == comp["t_p"]


def test_pareto_sets(grid):
    assert report.pareto_optimal([(0, 0), (1, 1), (2, 0.5), (1, 1), (0.5, -0.1)]) == [True, True, False, True, False]
    entry = grid["models"][0]
    label = {name: report.cell_label(MODEL, name, "abs") for name in VARIANTS}
    # UAT: costs 0.06 < 0.11 < 0.20 with gains 0.013 < 0.093 < 0.207: a clean trade-off, all optimal
    assert entry["pareto"]["uat"]["optimal"] == [label["mlp_in"], label["mlp_both"], label["mlp_in_attn_out"]]
    # HotFlip: mlp_in_attn_out costs more (0.11 > 0.06) and gains less (0.027 < 0.080) than mlp_in
    assert entry["pareto"]["hotflip"]["optimal"] == [label["mlp_in"], label["mlp_both"]]
    assert entry["pareto"]["hotflip"]["dominated"] == [label["mlp_in_attn_out"]]
    assert entry["pareto"]["hotflip"]["baseline_optimal"]
    assert _row(grid, "mlp_in_attn_out")["pareto"] == {"uat": True, "hotflip": False}


# --------------------------------------------------------------------------- findings
def _sentence(grid: dict[str, Any], start: str) -> str:
    found = [s for s in grid["findings"] if s.startswith(start)]
    assert len(found) == 1, (start, grid["findings"])
    return found[0]


def test_findings_follow_the_numbers_when_the_variants_swap(grid, cells):
    swapped = report.grid_analysis(
        [make_cell("mlp_in", VARIANTS["mlp_both"], SEEDS), make_cell("mlp_both", VARIANTS["mlp_in"], SEEDS), cells[2]]
    )
    for g, cheap, robust in ((grid, "mlp_in", "mlp_both"), (swapped, "mlp_both", "mlp_in")):
        cost = _sentence(g, f"{MODEL}, quality cost")
        assert f"lowest point estimate for {cheap} (abs), +0.06000" in cost  # intervals overlap: no "best" claim
        assert f"highest point estimate for {robust} (abs), +0.2000" in cost
        assert "perplexity ratio 1.062" in cost
        assert "overlaps that of" in cost  # [0.035, 0.085] and [0.076, 0.324] overlap: order not established
        uat = _sentence(g, f"{MODEL}, UAT robustness gain")
        assert f"largest for {robust} (abs), +0.2067" in uat and f"smallest for {cheap} (abs), +0.01333" in uat
        assert "lies entirely above every other variant's" in uat
        pareto = _sentence(g, f"{MODEL}, HotFlip: Pareto-optimal")
        assert pareto.endswith("dominated (point estimates): mlp_in_attn_out (abs).")
        holm = _sentence(g, f"{MODEL}, UAT absolute loss increase")
        assert f"1 of 3 differences remains significant at α=0.05 ({robust} (abs): less damage" in holm
        assert "Significant before the correction only: mlp_in_attn_out (abs)" in holm
        assert "3 of 3 differences remain significant" in _sentence(g, f"{MODEL}, Δ test loss")
        for s in g["findings"]:
            assert "best" not in s and "most robust" not in s and "winner" not in s


def test_baselines_that_differ_between_variants_are_named(cells):
    assert report.grid_analysis(cells)["models"][0]["baseline_mismatches"] == []
    other = json.loads(json.dumps(cells[1]))
    rec = next(
        v
        for v in other["results"]["values"]
        if (v["seed"], v["stage"], v["model"], v["metric"]) == (1337, "evaluate", "baseline", "loss")
    )
    rec["value"] += 0.01
    g = report.grid_analysis([cells[0], other])
    assert [(m["seed"], m["metric"]) for m in g["models"][0]["baseline_mismatches"]] == [(1337, "loss")]
    assert any("differ between the variants in seed(s) 1337" in s for s in g["findings"])


def test_bad_cells_are_refused(cells):
    with pytest.raises(ValueError, match="at least one cell"):
        report.grid_analysis([])
    with pytest.raises(ValueError, match="cell 0: missing field"):
        report.grid_analysis([{k: v for k, v in cells[0].items() if k != "init"}])
    with pytest.raises(ValueError, match="cell 1 repeats tiny-neox/mlp_in-abs"):
        report.grid_analysis([cells[0], cells[0]])
    with pytest.raises(ValueError, match="parameters"):
        report.grid_analysis([dict(cells[0], parameters=10), dict(cells[1], parameters=20)])
    with pytest.raises(ValueError, match="not a results.json"):
        report.grid_analysis([dict(cells[0], results={"meta": {}})])


# --------------------------------------------------------------------------- renderers
def test_markdown_latex_and_csv(grid):
    links = {report.cell_label(MODEL, v, "abs"): f"cells/{v}/report.md" for v in VARIANTS}
    md = report.grid_markdown(grid, plots={"tradeoff-tiny-neox": "tradeoff-tiny-neox.png"}, cell_reports=links)
    assert grid["axes"] == {"model": [MODEL], "variant": list(VARIANTS), "init": ["abs"]}
    assert "3 cells (models: `tiny-neox`; variants: `mlp_in`, `mlp_both`, `mlp_in_attn_out`; inits: `abs`)" in md
    # per model a quality table and one per attack, none wider than 8 columns
    assert md.count("| Variant (init) |") == 3
    assert max(line.count("|") - 1 for line in md.splitlines() if line.startswith("| Variant (init) |")) <= 8
    assert "Holm" in md and "uncorrected" in md and "results.json keep the uncorrected p-values" in md
    assert md.count("Holm's step-down method") == 1  # the multiple-comparison paragraph once (Methods)
    assert "the geometric mean of the per-seed perplexity ratios" in md and "per-document" not in md
    assert all(f"- {s}" in md for s in grid["findings"])
    assert "![tiny-neox: quality cost" in md and "(tradeoff-tiny-neox.png)" in md
    assert all(f"]({path})" in md for path in links.values())
    # every interval column named with its CI method
    assert "95% CI — Δ loss: " in md and "95% CI — loss increase: " in md and "; robustness gain: " in md
    quality, uat, _hotflip = [
        [c.strip() for c in x.strip("|").split("|")]
        for x in md.splitlines()
        if x.startswith("| mlp_in_attn_out (abs) |")
    ]
    assert quality[1] == "3 seeds" and quality[3] == "+0.1100 [0.08516, 0.1348]"
    # one sign convention: the table's robustness gain is the findings' gain (baseline − constrained)
    row = _row(grid, "mlp_in_attn_out")["attacks"]["uat"]
    test, gain = row["difference"], row["gain"]
    assert gain["value"] == pytest.approx(-test["value"]) and gain["value"] > 0
    assert uat[4].startswith(report.cross_cell.terms.fmt_value(gain["value"], sign=True)) and uat[4].startswith("+")
    uat_gains = [x.split("|")[5].split()[0] for x in md.splitlines() if x.startswith("| mlp_") and "UAT" not in x]
    finding = _sentence(grid, f"{MODEL}, UAT robustness gain")
    assert all(g.startswith("+") for g in uat_gains[3:6]), uat_gains  # positive in table and findings alike
    assert any(g in finding for g in uat_gains[3:6]), (uat_gains, finding)
    assert uat[5] == f"{report.formatting.fmt_p(test['t_p'])} ({report.formatting.fmt_p(test['p_holm'])})"
    assert uat[-1] == "yes" and _hotflip[-1] == "—"  # Pareto-optimal under UAT only

    tex = report.grid_latex(grid)
    assert tex.count(r"\begin{table*}") == 3 and r"\toprule" in tex and r"\bottomrule" in tex
    assert r"mlp\_in\_attn\_out (abs)" in tex and r"$\Delta$ loss" in tex and "_" not in tex.replace(r"\_", "")

    rows = list(csv.DictReader(io.StringIO(report.grid_csv(grid))))
    assert tuple(rows[0]) == report.cross_cell.render.CSV_COLUMNS
    hotflip = next(
        r for r in rows if r["variant"] == "mlp_in_attn_out" and r["attack"] == "hotflip" and r["measure"] == "gain"
    )
    assert hotflip["pareto_optimal"] == "False" and hotflip["unit"] == "seeds" and hotflip["n"] == "3"
    diff = next(
        r for r in rows if r["variant"] == "mlp_in_attn_out" and r["attack"] == "uat" and r["measure"] == "difference"
    )
    assert float(diff["p_holm"]) == pytest.approx(test["p_holm"]) and float(diff["t_p"]) == pytest.approx(test["t_p"])
    assert json.loads(json.dumps(grid)) == grid  # JSON-able as it is


# --------------------------------------------------------------------------- figures
def _png(path) -> None:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 600 and im.size[1] > 300


def test_figures_are_valid_and_deterministic(grid, cells, tmp_path):
    first = plots_grid.render_grid_plots(grid, tmp_path / "a")
    second = plots_grid.render_grid_plots(grid, tmp_path / "b")
    assert list(first) == ["tradeoff-tiny-neox"]  # one model: no across-model figure
    assert first["tradeoff-tiny-neox"].name == "tradeoff-tiny-neox.png"
    _png(first["tradeoff-tiny-neox"])
    assert first["tradeoff-tiny-neox"].read_bytes() == second["tradeoff-tiny-neox"].read_bytes()
    # two model sizes: one trade-off figure per model, and gain against size
    sized = [dict(c, parameters=1_200_000) for c in cells] + [
        dict(c, model="org/tiny-neox wide", parameters=4_800_000) for c in cells
    ]
    g = report.grid_analysis(sized)
    assert [s["variant"] for s in g["across_models"]["series"]] == list(VARIANTS)
    figures = plots_grid.render_grid_plots(g, tmp_path / "c")
    assert sorted(figures) == ["size", "tradeoff-org-tiny-neox-wide", "tradeoff-tiny-neox"]
    for path in figures.values():
        _png(path)
    assert any("at 1.2M parameters (tiny-neox); +" in s for s in g["findings"])


# --------------------------------------------------------------------------- one seed
@pytest.fixture(scope="module")
def one_seed_grid() -> dict[str, Any]:
    return report.grid_analysis([make_cell(name, numbers, (42,)) for name, numbers in VARIANTS.items()])


def test_one_seed_grid_tests_within_the_seed(one_seed_grid, tmp_path):
    from scipy.stats import t as student_t

    p_quality = []
    for name, numbers in VARIANTS.items():
        row = _row(one_seed_grid, name)
        assert row["n_seeds"] == 1
        delta = row["quality"]["delta_loss"]
        mono = np.array([d["nll"] / 100 for d in _doc_losses(f"{name}-monotonic", 42, 3.0 + numbers["dloss"][0])])
        base = np.array([d["nll"] / 100 for d in _doc_losses("baseline", 42, 3.0)])
        d = mono - base
        t = d.mean() / (d.std(ddof=1) / math.sqrt(d.size))
        half = student_t.ppf(0.975, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size)
        _assert_estimate(delta, numbers["dloss"][0], d.mean() - half, d.mean() + half, n=N_DOCS, unit="documents")
        assert delta["t_p"] == pytest.approx(2 * student_t.sf(abs(t), d.size - 1), rel=1e-6)
        assert row["quality"]["perplexity_ratio"]["value"] == pytest.approx(math.exp(numbers["dloss"][0]))
        p_quality.append(delta["t_p"])
        uat = row["attacks"]["uat"]
        assert (uat["difference"]["unit"], uat["difference"]["n"]) == ("texts", N_TEXTS)
        assert uat["gain"]["value"] == pytest.approx(0.40 - numbers["uat"][0], abs=1e-9)
        assert (
            uat["constrained_abs_increase"]["unit"] == "texts" and uat["constrained_abs_increase"]["ci_low"] is not None
        )
        assert uat["gain"]["per_seed"] == [{"seed": 42, "value": pytest.approx(0.40 - numbers["uat"][0], abs=1e-9)}]
    expected = _holm_by_hand(p_quality)
    assert [_row(one_seed_grid, n)["quality"]["delta_loss"]["p_holm"] for n in VARIANTS] == pytest.approx(expected)
    assert _sentence(one_seed_grid, f"{MODEL}: one seed (42)")
    md = report.grid_markdown(one_seed_grid, plots={}, cell_reports={})
    assert "(n=40 documents)" in md and "(n=40 texts)" in md and "1 seed" in md
    assert "with one seed: from the mean per-document loss difference" in md and "per-seed perplexity" not in md
    figures = plots_grid.render_grid_plots(one_seed_grid, tmp_path)
    _png(figures["tradeoff-tiny-neox"])


def test_equal_variants_are_called_equal(cells):
    twin = dict(cells[0], variant="mlp_in_copy")
    g = report.grid_analysis([cells[0], twin])
    cost = _sentence(g, f"{MODEL}, quality cost")
    assert "the same for all 2 variants, mlp_in (abs), +0.06000" in cost and "lowest" not in cost
    g = report.grid_analysis([cells[0], twin, cells[1]])
    cost = _sentence(g, f"{MODEL}, quality cost")
    assert "lowest point estimate for mlp_in (abs) and mlp_in_copy (abs) (tied), +0.06000" in cost
    assert "highest point estimate for mlp_both (abs), +0.2000" in cost


def test_labels_of_close_points_take_different_places():
    from monolm.report.cross_cell.figures import LABEL_SLOTS, label_offsets

    lim = (-0.1, 0.9), (-0.25, 0.35)  # the HotFlip panel of a 3-variant tiny grid
    # mlp_in and mlp_in_attn_out 0.05 apart in cost and 0.02 in gain: their labels would overlap
    slots = label_offsets([(0.333, 0.031), (0.568, 0.121), (0.280, 0.052)], *lim)
    assert slots[0] == slots[1] == LABEL_SLOTS[0]  # far apart: both above right
    assert slots[2] != slots[0]
    # four points on one spot take four places; the next falls back to the first
    assert label_offsets([(0.3, 0.0)] * 5, *lim) == [*LABEL_SLOTS, LABEL_SLOTS[0]]
