"""The damage-matched arm (issue 23): the baseline's constrained-role matrices perturbed by
Gaussian noise, the scale bisected to the constrained arm's validation loss."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from monolm.constraint.softplus import apply_constraint
from monolm.controls.damage import (
    Perturbation,
    bisect_scale,
    constrained_matrices,
    damage_matrices,
    match_damage,
)
from tests.helpers import counter_blocks, tiny_neox


def _loss(model, blocks) -> float:
    with torch.no_grad():
        logits = model(blocks).logits[:, :-1]
        return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1)))


def test_bisection_reaches_a_monotone_target_within_tolerance():
    result = bisect_scale(lambda s: 2.0 + s**2, 11.0, tolerance=1e-3, max_steps=40, initial_scale=0.5)
    assert result.within_tolerance and abs(result.loss - 11.0) <= 1e-3
    assert abs(result.scale - 3.0) < 1e-3
    assert result.steps == len(result.trace) <= 40


def test_bisection_out_of_steps_keeps_the_closest_scale_and_says_so():
    result = bisect_scale(lambda s: s, 100.0, tolerance=1e-6, max_steps=3, initial_scale=1.0)
    assert not result.within_tolerance and result.steps == 3
    assert result.scale == 2.0 and "no scale within" in result.note


def test_a_baseline_already_as_bad_as_the_target_gets_no_noise():
    result = bisect_scale(lambda s: 5.0 + s, 4.0, tolerance=0.1, max_steps=8)
    assert result.scale == 0.0 and result.steps == 1 and "already" in result.note


@pytest.fixture(scope="module")
def trained():
    """A micro GPT-NeoX that has learnt the counter a little, so noise can make it worse."""
    blocks = counter_blocks(16)
    model = tiny_neox(seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(12):
        logits = model(blocks).logits[:, :-1]
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), blocks


def test_damage_matches_the_target_loss_on_the_micro_model_and_is_deterministic(trained):
    base, blocks = trained
    clean = _loss(base, blocks)
    target, tol = clean + 0.3, 0.01
    names = damage_matrices(base, "mlp_both")

    def run(seed: int):
        model = copy.deepcopy(base)
        search = match_damage(model, names, lambda m: _loss(m, blocks), target, seed=seed, tolerance=tol, max_steps=30)
        return model, search

    model, search = run(7)
    assert search.within_tolerance and abs(_loss(model, blocks) - target) <= tol
    again, search_again = run(7)
    assert search_again.trace == search.trace
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    other, _ = run(8)
    assert not torch.equal(other.state_dict()[f"{names[0]}.weight"], model.state_dict()[f"{names[0]}.weight"])


@pytest.mark.parametrize("variant", ["mlp_in", "mlp_both", "mlp_in_attn_out"])
def test_the_perturbed_matrices_are_exactly_the_constrained_variants(variant):
    base = tiny_neox(seed=1)
    constrained = copy.deepcopy(base)
    apply_constraint(constrained, variant, "abs")
    names = damage_matrices(base, variant)
    assert names == constrained_matrices(constrained) and names
    before = {k: v.clone() for k, v in base.state_dict().items()}
    Perturbation(base, names, seed=0).apply(0.3)
    changed = {k for k, v in base.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"{n}.weight" for n in names}


def test_noise_is_scaled_per_matrix_by_its_rms():
    base = tiny_neox(seed=2)
    name = damage_matrices(base, "mlp_in")[0]
    weight = dict(base.named_modules())[name].weight
    with torch.no_grad():
        weight.mul_(10.0)
    original = weight.detach().clone()
    Perturbation(base, [name], seed=0).apply(0.5)
    ratio = float((weight.detach() - original).pow(2).mean().sqrt() / original.pow(2).mean().sqrt())
    assert ratio == pytest.approx(0.5, rel=0.05)


def test_every_attack_of_the_registry_has_a_damage_runner_and_a_planned_cost():
    """So the damage stage's `not_attacked` is empty and `monolm plan` counts what it runs."""
    from monolm.controls.attack_runners import RUNNERS
    from monolm.memory.plans import DAMAGE_ATTACKS
    from monolm.study.registry import ATTACKS

    assert set(RUNNERS) == set(ATTACKS)
    assert set(DAMAGE_ATTACKS) == set(RUNNERS)


def test_the_gcg_runner_attacks_the_damaged_model_as_the_gcg_stage_attacks_an_arm(tmp_path):
    """Same settings, texts and seed as `gcg.run` on an arm: the same best trigger and per-text
    losses, without the random control (no control units are written)."""
    from monolm.attacks import gcg
    from monolm.config import GCGConfig, TinyModelConfig
    from monolm.controls.attack_runners import RUNNERS
    from monolm.data import splits as data_lib
    from monolm.models import loading as models
    from tests.helpers import micro_config

    docs = data_lib.embedded_documents()
    tok = data_lib.train_bpe_tokenizer(docs[20:], 300)
    model = models.build_tiny_model(
        TinyModelConfig(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tok, seed=0
    )
    ids = data_lib.tokenize(tok, docs[:14])
    opt, held_out = ids[:4], ids[4:]
    cfg = micro_config(tmp_path)
    settings = GCGConfig(
        trigger_len=2, steps=2, search_width=4, topk=6, restarts=1, n_opt_texts=4, n_eval_texts=6, text_max_tokens=16
    )
    got = RUNNERS["gcg"](cfg, settings, model, tok, opt, held_out, seed=7, out_dir=tmp_path / "damage")
    arm = gcg.run(
        model,
        tok,
        opt,
        held_out,
        settings,
        seed=7,
        out_dir=tmp_path / "arm",
        success_threshold=cfg.attacks.success_threshold,
    )
    assert got["clean"] == arm["per_text"]["clean"] and got["attacked"] == arm["per_text"]["attacked"]
    assert len(got["attacked"]) == settings.n_eval_texts
    assert got["summary"]["abs_increase"] == pytest.approx(arm["eval"]["abs_increase"]["mean"])
    assert not list((tmp_path / "damage").glob("gcg_control*"))


def test_plan_counts_gcg_in_the_damage_arms_cost():
    from monolm.config import load_config
    from monolm.memory.plans import plan_table

    def damage_flops(*sets):
        rows = plan_table(load_config("full", sets=list(sets)))[1]
        return {r["stage"]: r for r in rows}["damage"]["flops"]

    assert damage_flops("attacks.gcg.steps=1000") > damage_flops("attacks.gcg.steps=10") > 0
