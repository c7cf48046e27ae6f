"""Stage 1: W = softplus(V) >= 0 on the right modules, exact conversion, persistence, drift and
the honest monotonicity measurement."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_neox
from safetensors import safe_open
from torch import nn
from torch.nn.utils import parametrize
from transformers import GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from monolm.constraint.drift import function_drift
from monolm.constraint.monotonicity import capture_inputs, monotonicity_violation_rate
from monolm.constraint.softplus import (
    NonNegativeSoftplus,
    apply_constraint,
    constrained_targets,
    constrained_weights,
    convert_weight,
    inverse_softplus,
    is_constrained,
    load_constrained,
    merge,
    min_constrained_weight,
    resolve_targets,
    role_index,
    save_constrained,
)

LAYERS = 4


def neox(**overrides) -> GPTNeoXForCausalLM:
    """A randomly initialised GPT-NeoX of this file's shape (4 layers, hidden 128, vocab 2,048)."""
    return tiny_neox(vocab=2048, hidden=128, layers=LAYERS, max_positions=256, **overrides)


@pytest.fixture(scope="module")
def neox_state() -> dict[str, torch.Tensor]:
    return neox().state_dict()


def make_neox(state: dict[str, torch.Tensor], **overrides) -> GPTNeoXForCausalLM:
    model = neox(**overrides)
    model.load_state_dict(state)
    return model.eval()


def make_llama(tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(1)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg).eval()


def tokens(n: int = 4, t: int = 32, vocab: int = 2048, seed: int = 0) -> torch.Tensor:
    return torch.randint(vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def constrained_names(model: nn.Module) -> set[str]:
    return {name.removesuffix(".weight") for name, _ in constrained_weights(model)}


def parametrized_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if parametrize.is_parametrized(m)}


# --------------------------------------------------------------------------- softplus maths
def test_inverse_softplus_is_stable_and_round_trips():
    y = torch.logspace(-8, 4, 2001, dtype=torch.float64)
    v = inverse_softplus(y)
    assert torch.isfinite(v).all()
    # F.softplus switches to the identity above 20, an approximation of relative size ~1e-10.
    torch.testing.assert_close(F.softplus(v), y, rtol=1e-9, atol=0)
    y32 = y.float()
    v32 = inverse_softplus(y32)
    assert v32.dtype == torch.float32 and torch.isfinite(v32).all()
    torch.testing.assert_close(F.softplus(v32), y32, rtol=2e-6, atol=0)
    # the naive formula overflows / underflows where this one does not
    assert torch.isinf(torch.log(torch.expm1(torch.tensor([1e4], dtype=torch.float32)))).all()
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            inverse_softplus(torch.tensor([1.0, bad]))


def test_conversion_of_non_negative_weights_is_exact():
    g = torch.Generator().manual_seed(0)
    w = torch.rand(64, 32, generator=g) * 0.1 + 1e-6  # >= eps
    lin = nn.Linear(32, 64)
    with torch.no_grad():
        lin.weight.copy_(w)
    parametrize.register_parametrization(lin, "weight", NonNegativeSoftplus(1e-6))
    torch.testing.assert_close(lin.weight, w, rtol=1e-6, atol=0)
    # assigning a non-negative W sets V (right_inverse), again exactly
    w2 = torch.rand(64, 32, generator=g) + 1e-6
    lin.weight = w2
    torch.testing.assert_close(lin.weight, w2, rtol=1e-6, atol=0)
    torch.testing.assert_close(F.softplus(lin.parametrizations.weight.original), w2, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="negative"):
        lin.weight = -w2
    # clamp keeps an already non-negative pretrained weight as it is
    assert torch.equal(convert_weight(w, "clamp", 1e-6), w)


def test_abs_and_clamp_conversions_differ_as_documented(neox_state):
    eps = 1e-6
    original = make_neox(neox_state)
    w0 = original.gpt_neox.layers[0].mlp.dense_h_to_4h.weight.detach().clone()
    neg = w0 < 0
    assert neg.any() and (~neg).any()
    models, summaries = {}, {}
    for init in ("abs", "clamp"):
        models[init] = make_neox(neox_state)
        summaries[init] = apply_constraint(models[init], "mlp_in", init=init, eps=eps)
    w_abs = models["abs"].gpt_neox.layers[0].mlp.dense_h_to_4h.weight.detach()
    w_clamp = models["clamp"].gpt_neox.layers[0].mlp.dense_h_to_4h.weight.detach()
    torch.testing.assert_close(w_abs, w0.abs() + eps, rtol=1e-5, atol=1e-9)  # flips negatives
    torch.testing.assert_close(w_clamp, w0.clamp_min(eps), rtol=1e-5, atol=1e-9)  # zeroes them
    big = w0 >= eps  # positive weights below eps are raised to eps by clamp
    torch.testing.assert_close(w_abs[big], w_clamp[big] + eps, rtol=1e-5, atol=1e-9)
    assert (w_clamp[neg] < 2 * eps).all() and (w_abs[neg] > w_clamp[neg]).all()
    s_abs, s_clamp = summaries["abs"], summaries["clamp"]
    assert s_abs.frac_negative_before == s_clamp.frac_negative_before
    assert 0.4 < s_abs.frac_negative_before < 0.6  # random-normal init: about half negative
    # |W| + eps moves each negative weight twice as far as clamping it to eps
    assert s_abs.rel_change > 1.9 * s_clamp.rel_change
    with pytest.raises(ValueError, match="init"):
        apply_constraint(make_neox(neox_state), "mlp_in", init="relu")


# --------------------------------------------------------------------------- which modules
def test_mlp_both_touches_exactly_the_ffn_projections(neox_state):
    model = make_neox(neox_state)
    total = sum(p.numel() for p in model.parameters())
    summary = apply_constraint(model, "mlp_both")
    expected = {f"gpt_neox.layers.{i}.mlp.{n}" for i in range(LAYERS) for n in ("dense_h_to_4h", "dense_4h_to_h")}
    assert constrained_names(model) == expected
    assert parametrized_names(model) == expected  # nothing else was reparametrized
    assert summary.n_modules == 2 * LAYERS
    assert summary.constrained_params == 2 * LAYERS * 128 * 512
    assert summary.total_params == total
    assert summary.share_of_params == pytest.approx(summary.constrained_params / total)
    assert {r.role for r in summary.modules} == {"mlp_in", "mlp_out"}
    json.dumps(summary.to_json())  # JSON-able as is


def test_mlp_in_and_mlp_in_attn_out_targets(neox_state):
    m_in = make_neox(neox_state)
    apply_constraint(m_in, "mlp_in")
    assert parametrized_names(m_in) == {f"gpt_neox.layers.{i}.mlp.dense_h_to_4h" for i in range(LAYERS)}
    m_attn = make_neox(neox_state)
    apply_constraint(m_attn, "mlp_in_attn_out")
    assert parametrized_names(m_attn) == {
        f"gpt_neox.layers.{i}.{n}" for i in range(LAYERS) for n in ("mlp.dense_h_to_4h", "attention.dense")
    }
    roles = {t.name: t.role for t in constrained_targets(m_attn)}
    assert roles["gpt_neox.layers.0.attention.dense"] == "attn_out"
    assert roles["gpt_neox.layers.0.mlp.dense_h_to_4h"] == "mlp_in"


def test_gated_variants_on_llama():
    model = make_llama()
    apply_constraint(model, "gated_updown")
    assert parametrized_names(model) == {
        f"model.layers.{i}.mlp.{n}" for i in range(2) for n in ("up_proj", "down_proj")
    }
    model = make_llama()
    apply_constraint(model, "gated_all")
    assert parametrized_names(model) == {
        f"model.layers.{i}.mlp.{n}" for i in range(2) for n in ("gate_proj", "up_proj", "down_proj")
    }
    assert min_constrained_weight(model) > 0
    # Llama's attention output projection is recognised as the attention-out role (and left
    # alone by the gated variants)
    roles = {t.name: t.role for t in role_index(make_llama())}
    assert roles["model.layers.0.self_attn.o_proj"] == "attn_out"
    assert "model.layers.0.self_attn.o_proj" not in {t.name for t in resolve_targets(make_llama(), "gated_all")}
    with pytest.raises(ValueError, match=r"'mlp_in_attn_out'.*LlamaForCausalLM.*gated"):
        apply_constraint(make_llama(), "mlp_in_attn_out")


def test_unknown_or_unmatched_variant_raises_naming_it(neox_state):
    with pytest.raises(ValueError, match="'mlp_everything'"):
        apply_constraint(make_neox(neox_state), "mlp_everything")
    model = make_neox(neox_state)
    with pytest.raises(ValueError, match=r"'gated_all'.*GPTNeoXForCausalLM"):
        apply_constraint(model, "gated_all")
    assert not is_constrained(model)  # a failed resolution leaves the model untouched
    apply_constraint(model, "mlp_in")
    with pytest.raises(ValueError, match="already constrained"):
        apply_constraint(model, "mlp_in")
    with pytest.raises(ValueError, match="no constrained"):
        min_constrained_weight(make_neox(neox_state))


# --------------------------------------------------------------------------- training
def test_weights_stay_non_negative_through_adamw_steps(neox_state):
    model = make_neox(neox_state)
    apply_constraint(model, "mlp_both", init="clamp")  # clamp: many weights start at ~eps
    model.train()
    v_before = model.gpt_neox.layers[0].mlp.dense_h_to_4h.parametrizations.weight.original.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.1)
    ids = tokens(2, 32)
    for _ in range(3):
        with parametrize.cached():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        opt.step()
        opt.zero_grad()
        m = min_constrained_weight(model)
        assert 0.0 <= m < float("inf")
    v_after = model.gpt_neox.layers[0].mlp.dense_h_to_4h.parametrizations.weight.original.detach()
    assert not torch.equal(v_before, v_after)  # the constrained weights really trained
    for _, w in constrained_weights(model):
        assert (w >= 0).all() and torch.isfinite(w).all()


def test_cached_computes_softplus_once_per_module(neox_state):
    model = make_neox(neox_state)
    summary = apply_constraint(model, "mlp_in_attn_out")
    calls = []
    for m in model.modules():
        if isinstance(m, NonNegativeSoftplus):
            m.register_forward_hook(lambda *_: calls.append(1))
    ids = tokens(1, 16)
    with torch.no_grad(), parametrize.cached():
        a = model(input_ids=ids).logits
        b = model(input_ids=ids).logits
    assert len(calls) == summary.n_modules  # two forwards, one softplus per module
    assert torch.equal(a, b)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, a)


# --------------------------------------------------------------------------- persistence
class _NoTokenizer:
    def save_pretrained(self, directory):
        (directory / "tokenizer_marker.txt").write_text("saved")


def test_save_and_reload_keeps_the_parametrization(neox_state, tmp_path):
    model = make_neox(neox_state)
    apply_constraint(model, "mlp_in_attn_out", init="clamp", eps=1e-5)
    spec = {"variant": "mlp_in_attn_out", "init": "clamp", "eps": 1e-5}
    out = tmp_path / "constrained"
    save_constrained(model, _NoTokenizer(), out, spec)
    assert (out / "tokenizer_marker.txt").exists() and (out / "config.json").exists()
    assert json.loads((out / "constraint.json").read_text())["variant"] == "mlp_in_attn_out"
    with safe_open(out / "model.safetensors", "pt") as fh:
        keys = set(fh.keys())
    assert "gpt_neox.layers.0.mlp.dense_h_to_4h.parametrizations.weight.original" in keys
    assert "gpt_neox.layers.0.mlp.dense_h_to_4h.weight" not in keys
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]

    loaded = load_constrained(out)
    assert parametrized_names(loaded) == parametrized_names(model)
    assert loaded.get_output_embeddings().weight is not loaded.get_input_embeddings().weight  # Pythia: untied
    assert min_constrained_weight(loaded) >= 0
    ids = tokens(2, 24)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    # re-saving over an existing folder replaces it whole
    save_constrained(loaded, None, out, spec)
    assert not (out / "tokenizer_marker.txt").exists()
    assert torch.equal(load_constrained(out)(input_ids=ids).logits, loaded(input_ids=ids).logits)
    with pytest.raises(ValueError, match="lacks"):
        save_constrained(model, None, tmp_path / "x", {"variant": "mlp_in"})


def test_save_and_reload_with_tied_embeddings(tmp_path):
    model = make_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    apply_constraint(model, "gated_updown")
    save_constrained(model, None, tmp_path / "m", {"variant": "gated_updown", "init": "abs", "eps": 1e-6})
    loaded = load_constrained(tmp_path / "m")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied
    ids = tokens(2, 16, vocab=512)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_merge_gives_plain_linears_with_identical_logits(neox_state):
    model = make_neox(neox_state)
    apply_constraint(model, "mlp_both")
    ids = tokens(2, 24)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    merge(model)
    assert not is_constrained(model) and not parametrized_names(model)
    mlp = model.gpt_neox.layers[0].mlp
    assert type(mlp.dense_h_to_4h) is nn.Linear and (mlp.dense_h_to_4h.weight >= 0).all()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    # the merged state dict is a plain HF state dict
    fresh = neox(seed=1)
    fresh.load_state_dict(model.state_dict(), strict=True)


# --------------------------------------------------------------------------- drift
def test_function_drift(neox_state):
    base = make_neox(neox_state)
    same = make_neox(neox_state)
    ids = tokens(3, 20)
    mask = torch.ones_like(ids)
    mask[0, 15:] = 0  # right padding is ignored
    d0 = function_drift(base, same, ids, mask, batch_size=2)
    assert abs(d0["kl_mean"]) < 1e-6 and d0["nll_base"] == d0["nll_constrained"]
    assert d0["ppl_ratio"] == pytest.approx(1.0)
    assert d0["n_positions"] == 3 * 20 - 5 and d0["n_targets"] == 3 * 19 - 5
    constrained = make_neox(neox_state)
    apply_constraint(constrained, "mlp_both")
    constrained.train()
    d1 = function_drift(base, constrained, ids, mask, batch_size=2)
    assert d1["kl_mean"] > 1e-3 and d1["nll_base"] == pytest.approx(d0["nll_base"])
    assert constrained.training  # mode restored
    assert d1["ppl_ratio"] == pytest.approx(torch.tensor(d1["nll_constrained"] - d1["nll_base"]).exp().item())


# --------------------------------------------------------------------------- monotonicity
def _rates(rows, sublayer):
    return [r["coord_violation_rate"] for r in rows if r["sublayer"] == sublayer]


def test_monotonicity_linear_is_monotone_block_is_not(neox_state):
    model = make_neox(neox_state)
    apply_constraint(model, "mlp_in_attn_out")
    rows = monotonicity_violation_rate(model, 64, torch.Generator().manual_seed(0))
    assert {(r["sublayer"], r["role"]) for r in rows} == {
        (s, role) for s in ("linear", "block") for role in ("mlp_in", "attn_out")
    }
    assert len(rows) == 2 * 2 * LAYERS
    assert _rates(rows, "linear") == [0.0] * (2 * LAYERS)  # non-negative W ⇒ monotone, exactly
    # FFN block with a signed output projection, and attention, are not monotone
    assert all(r > 0 for r in _rates(rows, "block"))
    # on hidden states captured from a real forward pass as well
    ids = tokens(2, 32)
    captured = capture_inputs(model, ids)
    assert captured.linear["gpt_neox.layers.0.mlp.dense_h_to_4h"].shape == (64, 128)
    assert captured.blocks["gpt_neox.layers.0.attention"].hidden.shape == (2, 32, 128)
    rows = monotonicity_violation_rate(model, 32, torch.Generator().manual_seed(1), captured)
    assert {r["input_source"] for r in rows} == {"captured"}
    assert _rates(rows, "linear") == [0.0] * (2 * LAYERS)
    assert all(r > 0 for r in _rates(rows, "block"))
    # token ids are captured on the fly (the stage's call form)
    again = monotonicity_violation_rate(model, 32, torch.Generator().manual_seed(1), inputs=ids)
    assert again == rows  # same inputs and generator state, same numbers


def test_mlp_both_block_is_non_monotone_only_because_of_gelu(neox_state):
    """Both FFN weights non-negative: units in GELU's decreasing region (pre-activation below
    about -0.75, as a negative bias puts them in sparse-activation FFNs) make outputs fall as
    inputs rise. The same weights with ReLU, a monotone activation, give exactly 0 violations."""
    results = {}
    for act in ("gelu", "relu"):
        model = make_neox(neox_state, hidden_act=act)
        apply_constraint(model, "mlp_both")
        for layer in model.gpt_neox.layers:
            layer.mlp.dense_h_to_4h.bias.data.fill_(-2.0)
        rows = monotonicity_violation_rate(model, 64, torch.Generator().manual_seed(0))
        assert _rates(rows, "linear") == [0.0] * (2 * LAYERS)
        results[act] = _rates(rows, "block")
    assert all(r > 0 for r in results["gelu"])
    assert results["relu"] == [0.0] * (2 * LAYERS)


def test_constrained_weights_never_switch_autograd_off_for_the_caller():
    """The generator computes W without autograd but yields outside `no_grad`: a caller's loop
    body, and a caller that stops early, keep autograd on (a yield inside `no_grad` left it off for
    the rest of the process, and a later test's backward() failed)."""
    from monolm.constraint.softplus import constrained_weights

    model = tiny_neox(seed=0, constrained=True)
    weights = constrained_weights(model)
    name, w = next(weights)
    assert torch.is_grad_enabled() and not w.requires_grad and name.endswith(".weight")
    del weights  # stopped early
    assert torch.is_grad_enabled()
    assert all(torch.is_grad_enabled() for _ in constrained_weights(model))
