"""Universal GCG and its random control: tests that fail if the attack were wrong.

The model is test_attacks' small trained GPT-NeoX (one training per session); settings are tiny
so the file stays within seconds of that."""

from __future__ import annotations

import json
import types

import pytest
import torch
import torch.nn.functional as F
from test_attacks import TRIGGER_ATTACK, _opt_eval, _trained, run_attack, scored_rows, spied_run
from torch import nn

from monolm.attacks import curves, gcg, gcg_search, trigger_search, typeable
from monolm.attacks import scoring as common
from monolm.config import GCGConfig

CFG = GCGConfig(**TRIGGER_ATTACK, steps=4, search_width=8, topk=8)


@pytest.fixture(scope="session")
def trained():
    return _trained()


@pytest.fixture(scope="session")
def gcg_runs(trained, tmp_path_factory):
    """GCG (every scored mask recorded) and its control, seed 3."""
    out = tmp_path_factory.mktemp("gcg")
    res, calls = spied_run(trained, gcg, CFG, out)
    ctrl = run_attack(trained, gcg, CFG, out, control=True)
    return res, ctrl, calls, out


def test_best_loss_never_decreases_and_results_are_written(gcg_runs):
    res, ctrl, _, out = gcg_runs
    for r in (res, ctrl):
        assert len(r["curves"]) == CFG.restarts and len(r["restarts"]) == CFG.restarts
        for curve in r["curves"]:
            assert len(curve) == CFG.steps + 1
            assert all(b >= a for a, b in zip(curve, curve[1:], strict=False))
        assert r["opt"]["attacked_loss"] == max(u["opt_loss"] for u in r["restarts"]) == max(c[-1] for c in r["curves"])
        assert set(r["saturation"]) >= {"total", "tail_gain", "saturated"}
    assert res["opt"]["attacked_loss"] > res["opt"]["clean_loss"]
    assert json.loads((out / "gcg_results.json").read_text()) == res
    assert json.loads((out / "gcg_control_results.json").read_text()) == ctrl
    mean = res["mean_over_restarts"]["attacked"]
    for i, value in enumerate(mean):
        assert value == pytest.approx(sum(u["attacked"][i] for u in res["restarts"]) / CFG.restarts)


def test_recorded_triggers_rescore_to_recorded_per_text_losses(trained, gcg_runs):
    model, tok, held = trained
    opt, _ = _opt_eval(held)
    prefix = common.context_prefix(tok)
    texts = common.truncate(opt, CFG.text_max_tokens)
    for r in gcg_runs[:2]:
        for u in r["restarts"]:
            batch = trigger_search.trigger_batch(prefix, u["trigger_ids"], texts)
            fresh = common.score_candidates_loop(model, batch)
            assert torch.allclose(fresh, torch.tensor(u["opt_per_text"]), atol=1e-5, rtol=0)


def test_gcg_never_scores_trigger_or_prefix_tokens(trained, gcg_runs):
    _, _, held = trained
    _, _, calls, _ = gcg_runs
    opt, ev = _opt_eval(held)
    texts = {tuple(t[: CFG.text_max_tokens]) for t in opt + ev}
    heads = set()
    for tm, n, scored in scored_rows(calls):
        heads.add(n - len(scored))
        assert not tm[: n - len(scored)].any() and tm[n - len(scored) : n].all()
        assert tuple(scored) in texts, "a scored token is not an original text token"
    assert heads == {1, 1 + CFG.trigger_len}


def test_filtering_no_special_no_non_ascii_and_roundtrip(trained, gcg_runs):
    _, tok, _ = trained
    special = set(tok.all_special_ids)
    keep = typeable.survives_roundtrip(tok)
    for r in gcg_runs[:2]:
        for u in r["restarts"]:
            ids = u["trigger_ids"]
            assert not special & set(ids) and all(i < len(tok) for i in ids)
            assert all(tok.decode([i]).isascii() for i in ids)
            assert keep(ids), "a trigger does not survive decode/re-encode"


def test_kill_mid_restart_resumes_identically(trained, gcg_runs, tmp_path, monkeypatch):
    model, tok, held = trained
    opt, ev = _opt_eval(held)
    res = gcg_runs[0]
    calls = {"n": 0}
    real = gcg_search.check_deadline

    def killed(where):
        calls["n"] += 1
        if calls["n"] == CFG.steps + 3:  # restart 1, after its first steps
            raise KeyboardInterrupt
        return real(where)

    monkeypatch.setattr(gcg_search, "check_deadline", killed)
    with pytest.raises(KeyboardInterrupt):
        gcg.run(model, tok, opt, ev, CFG, seed=3, out_dir=tmp_path)
    assert list((tmp_path / "units").glob("gcgpart-*.json")), "the killed restart left its state"
    monkeypatch.setattr(gcg_search, "check_deadline", real)
    resumed = gcg.run(model, tok, opt, ev, CFG, seed=3, out_dir=tmp_path)
    for key in ("restarts", "curves", "trigger_ids", "eval", "mean_over_restarts"):
        assert resumed[key] == res[key], key
    assert not list((tmp_path / "units").glob("gcgpart-*.json"))


# --------------------------------------------------------------------------- a planted weakness
class Planted(nn.Module):
    """A model whose predictions are wrecked after one planted token: its embedding is scaled up,
    and every position after an input close to it gets a large logit perturbation (smooth in the
    input embedding, so the gradient points at the token)."""

    def __init__(self, inner: nn.Module, token: int, strength: float = 30.0) -> None:
        super().__init__()
        self.inner = inner
        with torch.no_grad():
            inner.get_input_embeddings().weight[token] *= 3
        e = inner.get_input_embeddings().weight[token].detach()
        self.register_buffer("u", e / e.norm())
        self.threshold = 0.6 * float(e.norm())
        g = torch.Generator().manual_seed(0)
        self.register_buffer("noise", torch.randn(inner.get_output_embeddings().weight.shape[0], generator=g))
        self.strength = strength

    def get_input_embeddings(self) -> nn.Module:
        return self.inner.get_input_embeddings()

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, **_):
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        logits = self.inner(inputs_embeds=inputs_embeds, attention_mask=attention_mask).logits
        presence = torch.cumsum(F.softplus(4 * (inputs_embeds.float() @ self.u - self.threshold)), dim=1)
        return types.SimpleNamespace(logits=logits + self.strength * presence[..., None] * self.noise)


def test_planted_weakness_found_by_gcg_not_by_control(trained, tmp_path):
    import copy

    model, tok, held = trained
    token = tok.encode(" the", add_special_tokens=False)[0]
    planted = Planted(copy.deepcopy(model), token).eval()
    opt, ev = _opt_eval(held)
    cfg = CFG.model_copy(update={"steps": 3, "restarts": 1, "topk": 4})
    res = gcg.run(planted, tok, opt, ev, cfg, seed=5, out_dir=tmp_path / "g")
    ctrl = gcg.run(planted, tok, opt, ev, cfg, seed=5, out_dir=tmp_path / "c", control=True)
    assert token in res["trigger_ids"], "GCG did not find the planted token in 3 steps"
    assert token not in ctrl["trigger_ids"]
    assert res["opt"]["attacked_loss"] > ctrl["opt"]["attacked_loss"] + 1.0


def test_saturation_verdicts():
    flat_end = [0.0, 1.0, 1.9, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    rising = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0]
    assert curves.saturation([flat_end])["saturated"]
    sat = curves.saturation([rising])
    assert not sat["saturated"] and sat["tail_share"] == pytest.approx(0.2)
    assert "too small" in curves.saturation_sentence("GCG", "baseline", sat)
    assert curves.uat_curve(
        [
            {"loss_before": 1.0, "best_candidate_loss": 2.0, "accepted": True},
            {"loss_before": 1.5, "best_candidate_loss": 1.2, "accepted": False},
        ]
    ) == [1.0, 2.0, 2.0]
