"""The training loop: schedule, budget, data order, accumulation, precision, constraint checks,
history and best-model selection. Tiny GPT-NeoX models, a few steps each."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import SEQ, constrain, counter_blocks, recipe, tiny_neox
from safetensors.torch import load_file
from torch import nn

from monolm.config import ArmConfig
from monolm.constraint.softplus import ConstraintViolation, constrained_modules
from monolm.training import DataOrder, LRSchedule, accumulate_gradients, total_steps_for, train


def arm(**kw) -> ArmConfig:
    return recipe("loop", **kw)


def cpu_train(model, blocks, a: ArmConfig, out, **kw):
    """`train` on the CPU without a progress bar, from seed 0 and without evaluation unless `kw` says."""
    return train(model, blocks, a, out, **{"seed": 0, "evaluate": None, "device": "cpu", "progress": False, **kw})


# --------------------------------------------------------------------------- budget and schedule
def test_total_steps_is_min_of_epochs_budget_and_max_steps():
    a = ArmConfig(epochs=2.0, micro_batch_size=4, grad_accum_steps=2)
    assert total_steps_for(a, 100) == math.ceil(2.0 * 100 / 8) == 25
    assert total_steps_for(a.model_copy(update={"max_steps": 10}), 100) == 10
    assert total_steps_for(a.model_copy(update={"epochs": 0.5}), 10) == 1


def test_lr_schedule_warmup_then_decay_to_min():
    s = LRSchedule(total_steps=20, warmup_steps=4, kind="cosine", min_lr_ratio=0.1)
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(4) == pytest.approx(1.0)
    values = [s(i) for i in range(4, 20)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))  # monotone decay
    assert s(20) == pytest.approx(0.1) and values[-1] > 0.1
    lin = LRSchedule(10, 0, "linear", 0.0)
    assert [lin(i) for i in (0, 5)] == [1.0, 0.5]
    assert all(LRSchedule(10, 2, "constant", 0.1)(i) == 1.0 for i in range(2, 10))


def test_data_order_is_a_seeded_permutation_per_epoch():
    order = DataOrder(10, seed=7)
    seen = torch.cat([order.take(4) for _ in range(5)])  # 20 = two epochs, batches cross the boundary
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert not torch.equal(seen[:10], seen[10:])  # a fresh permutation each epoch
    again, other = DataOrder(10, seed=7), DataOrder(10, seed=8)
    assert torch.equal(torch.cat([again.take(4) for _ in range(5)]), seen)
    assert not torch.equal(torch.cat([other.take(4) for _ in range(5)]), seen)
    # resuming from a position gives the same continuation
    resumed = DataOrder(10, seed=7, epoch=1, index=2)
    assert torch.equal(resumed.take(8), seen[12:20])


# --------------------------------------------------------------------------- accumulation
@pytest.mark.parametrize("constrained", [False, True])
def test_gradient_accumulation_equals_one_big_batch(constrained):
    data = counter_blocks(8)
    grads = []
    for micro in (8, 2):
        model = tiny_neox()
        if constrained:
            constrain(model)
        accumulate_gradients(model, data, micro, cache_parametrizations=constrained)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_training_with_accumulation_matches_one_batch_update(tmp_path):
    data = counter_blocks(32)
    results = []
    for micro, accum in ((8, 1), (2, 4)):
        model = tiny_neox()
        res = cpu_train(
            model,
            data,
            arm(micro_batch_size=micro, grad_accum_steps=accum, max_steps=3, lr=1e-3),
            tmp_path / f"{micro}x{accum}",
            seed=3,
        )
        assert res.effective_batch_size == 8
        results.append((model, res))
    (m1, r1), (m2, r2) = results
    # Adam divides by sqrt(v): entries whose true gradient is ~0 (e.g. the attention key bias,
    # which softmax ignores) turn float summation noise into +-lr steps. Everything else matches.
    diffs = torch.cat([(a - b).abs().flatten() for a, b in zip(m1.parameters(), m2.parameters(), strict=True)])
    assert (diffs > 1e-6).float().mean() < 1e-3
    assert diffs.max() <= 3 * 3e-3  # never more than one Adam step (lr=1e-3) per step apart
    losses = [[e["train_loss"] for e in r.history["log"]] for r in (r1, r2)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


# --------------------------------------------------------------------------- precision
def test_small_lr_moves_most_weights_in_fp32_even_from_a_bf16_model(tmp_path):
    """The original study's bug: pure-bf16 AdamW at lr=5e-5 left V frozen. Here both arms must move."""
    data = counter_blocks(16)
    recipe = arm(lr=5e-5, max_steps=3, log_every_steps=1)
    for constrained in (False, True):
        model = tiny_neox(seed=2)
        if constrained:
            constrain(model)
        model.to(torch.bfloat16)  # handed in low-precision: the loop must train fp32 anyway
        before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
        cpu_train(model, data, recipe, tmp_path / str(constrained), constrained=constrained)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        after = dict(model.named_parameters())
        if constrained:
            keys = [n for n in before if n.endswith("parametrizations.weight.original")]
            v = torch.cat([before[k].flatten() for k in keys])
            assert v.min() < -5 and v.max() < 0  # V really lives where bf16 spacing exceeds lr
        else:
            keys = [n for n in before if n.endswith(".weight") and after[n].ndim == 2 and "embed" not in n]
        assert keys
        changed = torch.cat([(after[k].detach() != before[k]).flatten() for k in keys]).float().mean()
        # fp32 moves ~100% of both; pure bf16 moves 0% of V and ~54% of the baseline weights here,
        # so the brief's ">50%" would not catch the baseline half of the bug: require 90%.
        assert changed > 0.9, f"only {changed:.1%} of {'V' if constrained else 'baseline'} entries moved"


def test_bf16_autocast_keeps_fp32_params_and_optimizer_state(tmp_path):
    model = constrain(tiny_neox())
    res = cpu_train(model, counter_blocks(16), arm(bf16="on", max_steps=2), tmp_path, constrained=True)
    assert res.history["summary"]["bf16_autocast"] is True
    assert all(p.dtype == torch.float32 for p in model.parameters())
    opt = load_file(str(tmp_path / "checkpoints" / "step-00000002" / "optimizer.safetensors"))
    assert opt and all(t.dtype == torch.float32 for t in opt.values())
    assert math.isfinite(res.final_metrics["train_loss"])


# --------------------------------------------------------------------------- constrained arm
def test_constrained_arm_logs_min_materialized_weight(tmp_path):
    model = constrain(tiny_neox())
    res = cpu_train(model, counter_blocks(16), arm(max_steps=4, log_every_steps=2, lr=1e-2), tmp_path, constrained=True)
    logged = [e["min_constrained_weight"] for e in res.history["log"]]
    assert len(logged) == 2 and all(0 <= w < 1e-3 for w in logged)
    actual = min(float(m.weight.detach().min()) for _, m in constrained_modules(model))
    assert res.history["log"][-1]["min_constrained_weight"] <= actual + 1e-12
    assert res.history["summary"]["min_constrained_weight"] <= min(logged)


class ShiftedSoftplus(nn.Module):
    """A broken "constraint" that lets weights go negative: the loop must refuse to continue."""

    def forward(self, v):
        return F.softplus(v) - 0.01

    def right_inverse(self, w):  # starts every weight at +1e-5: valid, but one step from negative
        return torch.full_like(w, math.log(math.expm1(0.01 + 1e-5)))


def test_negative_constrained_weight_aborts_training(tmp_path):
    model = tiny_neox()
    for layer in model.gpt_neox.layers:
        torch.nn.utils.parametrize.register_parametrization(layer.mlp.dense_h_to_4h, "weight", ShiftedSoftplus())
    with pytest.raises(ConstraintViolation, match=r"optimizer step 1: .*dense_h_to_4h\.weight"):
        cpu_train(model, counter_blocks(16), arm(lr=1e-2), tmp_path, constrained=True)


def test_arm_flag_must_match_the_model(tmp_path):
    with pytest.raises(ValueError, match="constrained=True"):
        train(tiny_neox(), counter_blocks(8), arm(), tmp_path, seed=0, evaluate=None, constrained=True, device="cpu")
    with pytest.raises(ValueError, match="constrained=False"):
        train(constrain(tiny_neox()), counter_blocks(8), arm(), tmp_path, seed=0, evaluate=None, device="cpu")


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    losses = {}
    for gc in ("off", "on"):
        model = constrain(tiny_neox())
        res = cpu_train(
            model,
            counter_blocks(16),
            arm(gradient_checkpointing=gc, max_steps=3, log_every_steps=1),
            tmp_path / gc,
            constrained=True,
        )
        flag = getattr(model, "is_activation_checkpointing", None)
        assert (flag if flag is not None else model.is_gradient_checkpointing) == (gc == "on")
        losses[gc] = [e["train_loss"] for e in res.history["log"]]
    assert losses["on"] == pytest.approx(losses["off"], rel=1e-5)


# --------------------------------------------------------------------------- history and best model
def test_history_and_best_model_selection(tmp_path):
    """Best = lowest validation perplexity of a trained model, and best/ holds exactly the weights
    evaluated then. The starting model is evaluated too (step 0: the curve starts where training
    did) but is never selected, even with the lowest perplexity."""
    scripted = iter([10.0, 30.0, 20.0, 25.0, 22.0])  # eval at steps 0, 2, 4, 6, 8 -> best is step 4
    snapshots = {}
    logs = []

    def evaluate(model):
        snapshots[len(snapshots)] = {k: v.clone() for k, v in model.state_dict().items()}
        ppl = next(scripted)
        return {"perplexity": ppl, "loss": math.log(ppl)}

    model = tiny_neox()
    res = cpu_train(
        model,
        counter_blocks(32),
        arm(max_steps=8, eval_every_steps=2, log_every_steps=3),
        tmp_path,
        evaluate=evaluate,
        on_log=logs.append,
    )
    assert res.completed and res.steps == res.total_steps == 8
    assert res.tokens_seen == 8 * 8 * SEQ
    hist = json.loads(res.history_path.read_text())
    assert [e["step"] for e in hist["log"]] == [3, 6, 8]  # every 3 steps plus the last
    for entry in hist["log"]:
        assert set(entry) == {
            "step",
            "epoch",
            "lr",
            "train_loss",
            "tokens_seen",
            "tokens_per_s",
            "wall_time_s",
            "grad_norm",
        }
        assert entry["tokens_per_s"] > 0 and entry["grad_norm"] > 0
    assert hist["log"][-1]["epoch"] == pytest.approx(8 * 8 / 32)
    assert [(e["step"], e["val_perplexity"]) for e in hist["eval"]] == [
        (0, 10.0),
        (2, 30.0),
        (4, 20.0),
        (6, 25.0),
        (8, 22.0),
    ]
    assert hist["eval"][1]["val_loss"] == pytest.approx(math.log(30.0))
    s = hist["summary"]
    assert (
        s["best_step"],
        s["best_val_perplexity"],
        s["total_steps"],
        s["effective_batch_size"],
        s["tokens_seen"],
    ) == (4, 20.0, 8, 8, res.tokens_seen)
    assert res.final_metrics["best_step"] == 4 and res.final_metrics["val_perplexity"] == 22.0
    assert [e["kind"] for e in logs].count("eval") == 5 and [e["kind"] for e in logs].count("train") == 3
    best = load_file(str(res.best_dir / "model.safetensors"))
    at_step_4 = snapshots[2]
    assert set(best) == set(at_step_4)
    assert all(torch.equal(best[k], at_step_4[k]) for k in best)
    assert not torch.equal(best["lm_head.weight"], model.state_dict()["lm_head.weight"])
    marker = json.loads((res.best_dir / "best.json").read_text())
    assert marker["step"] == 4 and marker["metrics"]["val_perplexity"] == 20.0
    assert sorted(p.name for p in res.best_dir.iterdir()) == ["best.json", "model.safetensors"]


def test_caller_save_model_writes_the_best_dir(tmp_path):
    calls = []

    def save(model, directory):
        calls.append(directory)
        (directory / "weights").mkdir()
        (directory / "weights" / "w.txt").write_text(str(float(model.get_output_embeddings().weight.detach().sum())))
        return ["weights/w.txt"]

    res = cpu_train(tiny_neox(), counter_blocks(16), arm(max_steps=2), tmp_path, save_model=save)
    assert len(calls) == 1 and (res.best_dir / "weights" / "w.txt").is_file()
    assert json.loads((res.best_dir / "best.json").read_text())["files"].keys() == {"weights/w.txt"}
    assert not any(p.name.startswith((".tmp-", ".old-")) for p in tmp_path.iterdir())


def test_evaluate_must_report_perplexity(tmp_path):
    with pytest.raises(KeyError, match="perplexity"):
        cpu_train(tiny_neox(), counter_blocks(16), arm(max_steps=3), tmp_path, evaluate=lambda m: {"loss": 1.0})
