"""Effective robustness (issue 23): synthetic results whose robustness is an exact function of
clean loss give every arm an interval containing 0 and the 'equal quality' verdict; an arm moved
above the curve is detected and named; an arm outside the ladder's range gets no verdict."""

from __future__ import annotations

import numpy as np
import pytest

from monolm.report import robustness as er


def _model(clean: float, shift: float = 0.0, seeds=(42,), n_docs: int = 30, n_texts: int = 24) -> dict:
    """A model whose mean increase is exactly 0.9 - 0.15 * clean (+ shift), with per-document and
    per-text noise shared by every model (the same documents and texts), mean zero."""
    out = {}
    for s in seeds:
        rng = np.random.default_rng(s)
        doc_noise = rng.normal(0, 0.3, n_docs)
        doc_noise -= doc_noise.mean()
        text_noise = rng.normal(0, 0.2, n_texts)
        text_noise -= text_noise.mean()
        tokens = np.full(n_docs, 50.0)
        out[s] = er.SeedPoint.of((clean + doc_noise) * tokens, tokens, 0.9 - 0.15 * clean + shift + text_noise)
    return out


LADDER = {"step30": 5.7, "step60": 5.3, "step100": 5.0, "base": 4.8, "baseline": 4.7}


@pytest.mark.parametrize("seeds", [(42,), (42, 1337, 2024)])
def test_on_the_curve_every_arm_is_as_robust_as_its_quality(seeds):
    refs = {name: _model(x, seeds=seeds) for name, x in LADDER.items()}
    arms = {"mlp_in-abs": _model(5.1, seeds=seeds), "mlp_both-abs": _model(5.45, seeds=seeds)}
    results, trend = er.effective_robustness(refs, arms, n_boot=500, seed=1)
    for arm, res in results.items():
        assert res.ci_low <= 0 <= res.ci_high, arm
        assert abs(res.effective) < 1e-9
        assert res.verdict == er.EQUAL
    assert trend["slope"] == pytest.approx(-0.15)
    assert trend["intercept"] == pytest.approx(0.9)


def test_an_arm_above_the_curve_is_detected_and_named():
    refs = {name: _model(x) for name, x in LADDER.items()}
    arms = {"on-curve": _model(5.1), "above": _model(5.2, shift=0.3), "robust": _model(5.4, shift=-0.3)}
    results, _ = er.effective_robustness(refs, arms, n_boot=500, seed=1)
    assert results["on-curve"].verdict == er.EQUAL
    above = results["above"]
    assert above.effective == pytest.approx(0.3)
    assert above.ci_low > 0 and above.verdict == er.LESS and above.p_value == 1 / 500  # every draw above 0
    assert results["robust"].verdict == er.MORE and results["robust"].ci_high < 0


def test_outside_the_ladder_no_verdict():
    refs = {name: _model(x) for name, x in LADDER.items()}
    results, trend = er.effective_robustness(refs, {"worse-than-every-rung": _model(6.5, shift=1.0)}, n_boot=200)
    res = results["worse-than-every-rung"]
    assert not res.in_range and res.verdict == er.OUTSIDE
    assert trend["range"] == pytest.approx([4.7, 5.7])


def test_models_must_share_documents_and_seeds():
    refs = {name: _model(x) for name, x in LADDER.items()}
    with pytest.raises(ValueError, match="not the same documents"):
        er.effective_robustness(refs, {"arm": _model(5.1, n_texts=10)}, n_boot=10)
    with pytest.raises(ValueError, match="has seeds"):
        er.effective_robustness(refs, {"arm": _model(5.1, seeds=(7,))}, n_boot=10)


def _cell_results(refs, arm):
    results, trend = er.effective_robustness(refs, {"monotonic": arm}, n_boot=500, seed=1)
    return {"robust_or_damaged": {"attacks": {"hotflip": {"arms": {k: v.to_json() for k, v in results.items()}}}}}


def test_grid_holm_corrects_over_a_models_cells_and_follows_the_corrected_p():
    from monolm.report.robust_grid import grid_effective, grid_section_lines

    refs = {name: _model(x) for name, x in LADDER.items()}
    cells = [
        {"model": "m", "variant": "mlp_in", "init": "abs", "results": _cell_results(refs, _model(5.1))},
        {"model": "m", "variant": "mlp_in", "init": "clamp", "results": _cell_results(refs, _model(5.2, shift=0.3))},
        {"model": "m", "variant": "mlp_both", "init": "abs", "results": _cell_results(refs, _model(6.5))},
    ]
    rows = grid_effective(cells)["m"]["hotflip"]
    assert [r["holm_m"] for r in rows] == [2, 2, 2]  # the cell outside the ladder is not tested
    assert rows[0]["verdict_holm"] == er.EQUAL
    assert rows[1]["verdict_holm"] == er.LESS and rows[1]["p_holm"] >= rows[1]["p_value"]
    assert rows[2]["p_holm"] is None and rows[2]["verdict_holm"] == er.OUTSIDE
    text = "\n".join(grid_section_lines(grid_effective(cells)))
    assert "## Robust or damaged?" in text and "| clamp |" in text and er.LESS in text


def _raw(mean_diff: float, significant: bool) -> dict:
    """The arms' primary test of HotFlip's absolute increase (monotonic − baseline), Holm-corrected."""
    return {
        "stage": "hotflip",
        "metric": "abs_increase",
        "a": "baseline",
        "b": "monotonic",
        "scope": "texts",
        "role": "primary",
        "mean_diff": mean_diff,
        "significant_holm": significant,
    }


@pytest.mark.parametrize(
    ("arm", "raw", "says"),
    [
        # Attacked less than the baseline only because it is worse at its job: on the ladder's curve.
        (_model(5.1), _raw(-0.2, True), "the robustness gain does not survive the quality control"),
        # Below the curve: the gain is more than its quality explains.
        (_model(5.1, shift=-0.3), _raw(-0.4, True), "the robustness gain survives the quality control"),
        # Above the curve while the raw gain looked like one: reversed.
        (_model(5.1, shift=0.3), _raw(-0.1, True), "the robustness gain reverses under the quality control"),
        # No raw difference, yet less robust than its quality predicts (the tiny demo's case).
        (_model(5.1, shift=0.3), _raw(0.05, False), "a loss the raw comparison does not show"),
        (_model(6.5), _raw(-0.2, True), "cannot check it"),
    ],
)
def test_findings_say_whether_a_raw_difference_survives_the_quality_control(arm, raw, says):
    from monolm.report.quality_control import quality_control_findings

    refs = {name: _model(x) for name, x in LADDER.items()}
    damage = {**raw, "b": "damage-matched", "mean_diff": 9.0}  # another pair's test: never the raw one
    results = {**_cell_results(refs, arm), "comparisons": [damage, raw]}
    (sentence,) = quality_control_findings(results)
    assert sentence.startswith("HotFlip, quality-controlled: ") and says in sentence
    assert f"{raw['mean_diff']:+.3f} nats/token" in sentence
    assert "9.000" not in sentence
