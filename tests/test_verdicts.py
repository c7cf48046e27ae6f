"""Verdicts that say only what the data support (issue 23 item 6): one test per misleading
sentence an audit found, each building its situation and checking the new sentence."""

from __future__ import annotations

import pytest

from monolm import report
from monolm.report import render
from monolm.report.cross_cell.cell_verdict import grid_verdict
from monolm.report.first_screen import headline_table
from monolm.report.sentences import finding
from monolm.report.summaries import summarize_values
from monolm.report.verdicts import apply_primary_holm
from tests.test_report_grid import BASELINE, MODEL, SEEDS, VARIANTS, make_cell


def _comp(stage, metric, p, diff=-0.1, scope="texts", seed=42):
    sentence = f"monotonic − baseline {metric}: {diff} (…), paired t-test p={p}, n=40 {scope}: " + (
        "significant at α=0.05" if p < 0.05 else "not significant at α=0.05"
    )
    return {"stage": stage, "metric": metric, "a": "monotonic", "b": "baseline", "scope": scope, "seed": seed,
            "mean_diff": diff, "t_p": p, "significant": p < 0.05, "sentence": sentence}  # fmt: skip


def test_a_secondary_relative_increase_at_p_0_046_is_no_robustness_verdict():
    """Was: 'more robust by this measure … significant' on HotFlip's relative increase at p=0.046,
    one of seven uncorrected tests, next to a bullet saying the effect can come from the clean loss."""
    comps = [
        _comp("evaluate", "doc_loss", 1e-20, diff=0.4, scope="documents"),
        _comp("uat", "abs_increase", 0.40),
        _comp("hotflip", "abs_increase", 0.20),
        _comp("uat", "rel_increase", 0.30),
        _comp("hotflip", "rel_increase", 0.046),
    ]
    assert apply_primary_holm(comps, 0.05) == 3  # the family: quality and each attack's absolute increase
    rel = finding(comps[-1], headline="HotFlip relative loss increase")
    assert "secondary measure, not a verdict" in rel
    assert "more robust" not in rel and "significant at α" not in rel and "before any correction" in rel


def test_a_primary_test_significant_only_before_holm_is_not_called_significant():
    comps = [
        _comp("evaluate", "doc_loss", 0.5, diff=0.1, scope="documents"),
        _comp("uat", "abs_increase", 0.40),
        _comp("hotflip", "abs_increase", 0.03),
    ]
    apply_primary_holm(comps, 0.05)
    hotflip = comps[-1]
    assert hotflip["p_holm"] == pytest.approx(0.09) and not hotflip["significant_holm"]
    text = finding(hotflip, headline="HotFlip absolute loss increase")
    assert "no significant difference after the Holm correction over the 3 primary tests" in text
    assert "more robust" not in text and "significant before the correction only" in text


def test_a_cell_report_in_a_grid_repeats_the_grids_corrected_verdict():
    """Was: a cell report claiming a gain at p=0.030 uncorrected that the grid, after Holm, rejects."""
    cells = [make_cell(name, numbers, SEEDS) for name, numbers in VARIANTS.items()]
    grid = report.grid_analysis(cells)
    cell = next(c for c in cells if c["variant"] == "mlp_in_attn_out")  # UAT: significant before Holm only
    results = {**cell["results"], "grid_verdict": grid_verdict(grid, f"{MODEL}/mlp_in_attn_out-abs")}
    md = render.markdown(results, plots={}, config_yaml="", config_path="config.yaml")
    head = md.split("## What was run")[0]
    assert "its verdict is the one that counts" in head
    uat = next(line for line in head.splitlines() if line.startswith("> - UAT absolute loss increase"))
    assert "Holm over 3 variants: not significant after Holm (significant at α=0.05 before the correction only)" in uat
    assert grid_verdict(grid, "no/such-cell") is None


def test_two_seeds_give_no_across_seed_test_and_say_what_each_seed_shows():
    """Was: 'no difference is significant' for the test loss with 2 seeds (1 degree of freedom)
    although both seeds show a clear loss increase and each seed's test gives a tiny p."""
    results = make_cell("mlp_both", VARIANTS["mlp_both"], (42, 1337))["results"]
    assert not [c for c in results["comparisons"] if c["scope"] == "seeds"]
    assert results["findings"][0].startswith("2 seeds: no across-seed test or interval is reported")
    quality = [f for f in results["findings"] if f.startswith("Held-out loss")]
    assert len(quality) == 2 and all("the constraint costs quality" in f for f in quality)
    table = headline_table(results)
    row = next(r for r in table.rows if r[0].startswith("Test loss"))
    assert row[6] == "seed 42: constrained worse; seed 1337: constrained worse"
    assert not any("no significant difference" in f for f in quality)


def test_identical_values_of_two_seeds_get_no_zero_width_interval():
    """Was: '62.5% [62.5%, 62.5%]' from two identical seed values."""
    values = [
        {"stage": "uat", "model": "monotonic", "metric": "success_rate", "seed": s, "value": 0.625} for s in (42, 1337)
    ]
    (rec,) = summarize_values(values, [{"seed": 42}, {"seed": 1337}])
    assert rec["ci_low"] is None and rec["ci_high"] is None and "needs at least 3" in rec["reason"]
    from monolm.report.formatting import fmt_ci

    assert fmt_ci(rec, pct=True) == "—"


def test_a_success_rate_of_zero_everywhere_is_one_sentence_not_a_headline_row():
    """Was: a UAT success rate that is 0% in every arm, cell and seed filling a headline row."""
    results = make_cell("mlp_in", VARIANTS["mlp_in"], SEEDS)["results"]
    for rec in results["values"]:
        if rec["stage"] == "uat" and rec["metric"] == "success_rate":
            rec["value"] = 0.0
    table = headline_table(results)
    assert not any(r[0].startswith("UAT success rate") for r in table.rows)
    assert any(r[0].startswith("HotFlip success rate") for r in table.rows)  # not constant: still a row
    assert "UAT success rate: 0% in every arm and seed" in table.note
    assert "reached the 15.0% threshold" in table.note or "reached the 15% threshold" in table.note


def test_a_pareto_claim_needs_intervals_that_separate_it_from_the_baseline():
    """Was: a Pareto claim on a gain of +0.004 with CI [−0.20, 0.21]."""
    hotflip = BASELINE["hotflip"]
    gains = (0.03, -0.02, 0.002)  # mean +0.004, interval far across 0
    noisy = {
        "dloss": (0.010, 0.012, 0.011),  # the cheapest variant: on the front by point estimates
        "uat": (0.40, 0.50, 0.45),
        "hotflip": tuple(hotflip[s] - g for s, g in zip(SEEDS, gains, strict=True)),
    }
    cells = [make_cell("mlp_both", VARIANTS["mlp_both"], SEEDS), make_cell("mlp_in", noisy, SEEDS)]
    grid = report.grid_analysis(cells)
    pareto = next(s for s in grid["findings"] if s.startswith(f"{MODEL}, HotFlip: Pareto-optimal"))
    assert "separate them from the baseline: mlp_both (abs)" in pareto
    assert "no Pareto claim is made: mlp_in (abs)" in pareto


def test_every_no_significant_difference_in_the_headline_states_its_mde():
    results = make_cell("mlp_in", VARIANTS["mlp_in"], SEEDS)["results"]
    table = headline_table(results)
    quiet = [r for r in table.rows if r[6].startswith("no significant difference")]
    assert quiet and all("detectable with 80% power: ±" in r[6] for r in quiet)
