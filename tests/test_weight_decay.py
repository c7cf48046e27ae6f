"""Weight decay is the same in kind for both arms: no decay on biases and norm weights, and the
constrained arm's W = softplus(V) is pulled towards 0 (materialized decay) or not at all, never
towards softplus(0) = ln 2 (which is where AdamW's decay of V would pull it)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import counter_blocks, recipe, tiny_neox

from monolm.config import ArmConfig
from monolm.constraint.softplus import constrained_modules, constrained_weights
from monolm.training import build_optimizer, train
from monolm.training import step as step_lib

LN2 = math.log(2.0)


def arm(**kw) -> ArmConfig:
    return recipe("decay", **kw)


def constrained_model(seed: int = 0):
    return tiny_neox(seed=seed, constrained=True)


def weights(model) -> dict[str, torch.Tensor]:
    return {name: w.clone() for name, w in constrained_weights(model)}


def zero_grad_step(model, a: ArmConfig, monkeypatch) -> None:
    """One real `training_step` in which every gradient is exactly zero, so only decay moves weights."""

    def zero_gradients(model, batch, micro_batch_size, **kw):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        return torch.zeros(())

    monkeypatch.setattr(step_lib, "accumulate_gradients", zero_gradients)
    _, optimizer, scheduler = build_optimizer(model, a, total_steps=10)
    step_lib.training_step(model, optimizer, scheduler, counter_blocks(4), a, constrained=True, bf16=False)


def test_groups_leave_biases_and_norms_undecayed_in_both_arms():
    for constrained in (False, True):
        model = constrained_model() if constrained else tiny_neox()
        names, optimizer = build_optimizer(model, arm(), total_steps=10)[:2]
        decay_of = {}
        params = dict(model.named_parameters())
        for group in optimizer.param_groups:
            for p in group["params"]:
                decay_of[next(n for n, q in params.items() if q is p)] = group["weight_decay"]
        assert sorted(decay_of) == sorted(names) == sorted(params)
        for name, wd in decay_of.items():
            if name.endswith("bias") or "layernorm" in name or "final_layer_norm" in name:
                assert wd == 0.0, name
            elif name.endswith("parametrizations.weight.original"):
                assert wd == 0.0, name  # AdamW never decays V
            else:
                assert wd == 0.1, name  # matrices and embeddings
        assert any(n.endswith("embed_in.weight") and wd == 0.1 for n, wd in decay_of.items())


def test_materialized_decay_pulls_constrained_weights_towards_zero_not_ln2(monkeypatch):
    model = constrained_model()
    before = weights(model)
    a = arm(constrained_weight_decay="materialized")
    zero_grad_step(model, a, monkeypatch)
    after = weights(model)
    factor = 1 - a.lr * a.weight_decay
    for name in before:
        torch.testing.assert_close(after[name], before[name] * factor, rtol=1e-5, atol=1e-12)
        small = before[name] < LN2
        assert bool((after[name][small] < before[name][small]).all()), name  # towards 0, also below ln 2


def test_decaying_v_would_pull_small_weights_up_to_ln2():
    """Why V is not in AdamW's decay group: decay of V moves W = softplus(V) towards ln 2."""
    model = constrained_model()
    v = next(m.parametrizations.weight.original for _, m in constrained_modules(model))
    w0 = torch.nn.functional.softplus(v.detach()).clone()
    optimizer = torch.optim.AdamW([v], lr=0.1, weight_decay=0.1)
    v.grad = torch.zeros_like(v)
    optimizer.step()
    w1 = torch.nn.functional.softplus(v.detach())
    small = w0 < LN2 - 1e-3
    assert small.any() and bool((w1[small] > w0[small]).all())


def test_no_decay_policy_leaves_constrained_weights_alone(monkeypatch):
    model = constrained_model()
    before = weights(model)
    embed = model.gpt_neox.embed_in.weight.detach().clone()
    a = arm()  # constrained_weight_decay defaults to "none"
    zero_grad_step(model, a, monkeypatch)
    for name, w in weights(model).items():
        assert torch.equal(w, before[name]), name
    torch.testing.assert_close(model.gpt_neox.embed_in.weight.detach(), embed * (1 - a.lr * a.weight_decay))


class ForeignSoftplus(torch.nn.Module):
    """A softplus parametrization that is not monolm's `NonNegativeSoftplus`."""

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softplus(v)


def test_materialized_decay_needs_the_softplus_parametrization():
    model = tiny_neox()
    for layer in model.gpt_neox.layers:
        torch.nn.utils.parametrize.register_parametrization(layer.mlp.dense_h_to_4h, "weight", ForeignSoftplus())
    with pytest.raises(ValueError, match="constrained_weight_decay='materialized' needs W = softplus"):
        build_optimizer(model, arm(constrained_weight_decay="materialized"), total_steps=10)


def test_materialized_decay_resumes_exactly(tmp_path):
    a = arm(lr=3e-3, constrained_weight_decay="materialized", max_steps=4)
    blocks = counter_blocks(16)
    straight = constrained_model()
    train(straight, blocks, a, tmp_path / "a", seed=1, evaluate=None, constrained=True, device="cpu", progress=False)
    train(
        constrained_model(),
        blocks,
        a,
        tmp_path / "b",
        seed=1,
        evaluate=None,
        constrained=True,
        device="cpu",
        progress=False,
        max_steps_this_call=2,
    )
    resumed = constrained_model()
    train(resumed, blocks, a, tmp_path / "b", seed=1, evaluate=None, constrained=True, device="cpu", progress=False)
    for (name, w), (_, w2) in zip(constrained_weights(straight), constrained_weights(resumed), strict=True):
        assert torch.equal(w, w2), name
