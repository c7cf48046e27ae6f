"""Checkpoints: exact resume, corruption fallback, fingerprints, pruning, no pickle."""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import VOCAB, counter_blocks, resume_recipe, tiny_neox
from safetensors.torch import load_file
from torch import nn

from monolm.config import ArmConfig
from monolm.core.artifacts import CorruptArtifact, atomic_dir, recover_replaced
from monolm.training import WALL_CLOCK_FIELDS, train
from monolm.training.checkpoint import (
    CheckpointMismatch,
    latest_valid_checkpoint,
    list_checkpoints,
    optimizer_from_safe,
    optimizer_to_safe,
    verify_checkpoint,
)


def model_(constrained: bool = False, hidden: int = 64, dropout: float = 0.1) -> nn.Module:
    # Dropout on, so a resume that failed to restore the torch RNG would diverge.
    return tiny_neox(hidden=hidden, dropout=dropout, constrained=constrained)


HELD_OUT = counter_blocks(8, seed=99)


def evaluate(model) -> dict:
    """A real (tiny) held-out perplexity, so best-model selection depends on the weights."""
    logits = model(input_ids=HELD_OUT, use_cache=False).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), HELD_OUT[:, 1:].reshape(-1)).item()
    return {"loss": loss, "perplexity": math.exp(loss)}


def arm_(**kw) -> ArmConfig:
    return resume_recipe(**kw)


def run(out: Path, *, constrained: bool = False, model=None, arm=None, data=None, stop=None, **kw):
    model = model if model is not None else model_(constrained)
    res = train(
        model,
        data if data is not None else counter_blocks(40),
        arm or arm_(),
        out,
        seed=5,
        evaluate=evaluate,
        constrained=constrained,
        device="cpu",
        progress=False,
        max_steps_this_call=stop,
        **kw,
    )
    return model, res


def comparable(history: dict) -> dict:
    """History without wall-clock fields and resume bookkeeping."""
    h = json.loads(json.dumps(history))
    h.pop("resumes", None)
    for entry in h["log"]:
        for key in WALL_CLOCK_FIELDS:
            entry.pop(key)
    return h


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def final_optimizer(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(list_checkpoints(out / "checkpoints")[-1][1] / "optimizer.safetensors"))


# --------------------------------------------------------------------------- exact resume
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The 12-step reference run of each arm, trained once per module."""
    cache = {}

    def get(constrained: bool):
        if constrained not in cache:
            out = tmp_path_factory.mktemp(f"straight-{constrained}")
            cache[constrained] = (out, *run(out, constrained=constrained))
        return cache[constrained]

    return get


@pytest.mark.parametrize("constrained", [False, True])
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path, constrained, uninterrupted):
    straight_dir, straight, r_straight = uninterrupted(constrained)
    assert r_straight.completed and r_straight.steps == 12 and r_straight.resumed_from is None

    _, r_part = run(tmp_path / "resumed", constrained=constrained, stop=7)  # stops mid log interval
    assert not r_part.completed and r_part.steps == 7
    assert [s for s, _ in list_checkpoints(tmp_path / "resumed" / "checkpoints")] == [4, 7]
    torch.manual_seed(1234), random.seed(1234), np.random.seed(1234)  # as if in a new process
    resumed, r_resumed = run(tmp_path / "resumed", constrained=constrained)  # a fresh model object
    assert r_resumed.resumed_from.name == "step-00000007" and r_resumed.completed

    assert_same_state(straight, resumed)
    opt_a, opt_b = final_optimizer(straight_dir), final_optimizer(tmp_path / "resumed")
    assert opt_a.keys() == opt_b.keys() and all(torch.equal(opt_a[k], opt_b[k]) for k in opt_a)
    assert comparable(r_straight.history) == comparable(r_resumed.history)
    on_disk = json.loads((tmp_path / "resumed" / "history.json").read_text())
    assert comparable(on_disk) == comparable(r_straight.history)
    assert on_disk["resumes"][0]["step"] == 7
    best_a = load_file(str(r_straight.best_dir / "model.safetensors"))
    best_b = load_file(str(r_resumed.best_dir / "model.safetensors"))
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)
    if constrained:
        assert any(k.endswith("parametrizations.weight.original") for k in best_a)


def test_finished_run_is_not_trained_again(tmp_path):
    done, first = run(tmp_path)
    again, second = run(tmp_path)
    assert second.steps == 12 and second.resumed_from.name == "step-00000012"
    assert_same_state(done, again)  # the final weights are loaded into the new model
    assert comparable(first.history) == comparable(second.history)


# --------------------------------------------------------------------------- corruption
def _bit_flip(ckpt: Path) -> None:
    path = ckpt / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def _truncate(ckpt: Path) -> None:
    path = ckpt / "optimizer.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def _incomplete(ckpt: Path) -> None:
    (ckpt / "checkpoint.json").unlink()


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_bit_flip, "sha256 differs"),
        (_truncate, "sha256 differs"),
        (_incomplete, "incomplete"),
    ],
)
def test_corrupt_latest_checkpoint_is_skipped_and_resume_stays_exact(tmp_path, caplog, damage, reason, uninterrupted):
    _, straight, _ = uninterrupted(False)
    out = tmp_path / "broken"
    run(out, stop=10)  # checkpoints at 4, 8 and 10
    newest = out / "checkpoints" / "step-00000010"
    damage(newest)
    with caplog.at_level(logging.WARNING, logger="monolm"):
        assert latest_valid_checkpoint(out / "checkpoints").name == "step-00000008"
    assert any(str(newest) in r.getMessage() and reason in r.getMessage() for r in caplog.records)

    resumed, res = run(out)
    assert res.resumed_from.name == "step-00000008" and res.completed
    assert_same_state(straight, resumed)
    assert list((out / "checkpoints" / ".invalid").iterdir())  # kept as evidence, not reused
    assert latest_valid_checkpoint(out / "checkpoints").name == "step-00000012"


def test_no_valid_checkpoint_means_a_fresh_start(tmp_path, caplog):
    assert latest_valid_checkpoint(tmp_path / "missing") is None
    run(tmp_path, stop=4)
    _incomplete(tmp_path / "checkpoints" / "step-00000004")
    (tmp_path / "checkpoints" / ".tmp-step-00000008-killed").mkdir()  # a killed writer's leftovers
    with caplog.at_level(logging.WARNING, logger="monolm"):
        assert latest_valid_checkpoint(tmp_path / "checkpoints") is None
    _, res = run(tmp_path, stop=4)
    assert res.resumed_from is None and res.steps == 4
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # cleaned by pruning


def test_verify_checkpoint_rejects_a_renamed_step(tmp_path):
    run(tmp_path, stop=4)
    ckpt = tmp_path / "checkpoints" / "step-00000004"
    verify_checkpoint(ckpt)
    ckpt.rename(tmp_path / "checkpoints" / "step-00000009")
    with pytest.raises(CorruptArtifact, match="records step 4"):
        verify_checkpoint(tmp_path / "checkpoints" / "step-00000009")


# --------------------------------------------------------------------------- fingerprints
def test_resuming_a_different_model_or_recipe_fails_naming_the_difference(tmp_path):
    run(tmp_path, stop=4)
    with pytest.raises(CheckpointMismatch, match=r"differ in dtype/shape.*gpt_neox\.embed_in\.weight"):
        run(tmp_path, model=model_(hidden=32))
    with pytest.raises(
        CheckpointMismatch,
        match=r"checkpoint tensor.*parametrizations\.weight\.original|"
        r"parametrizations\.weight\.original",
    ):
        run(tmp_path, constrained=True)
    with pytest.raises(CheckpointMismatch, match=r"config\.lr: checkpoint 0\.003 vs now 0\.001"):
        run(tmp_path, arm=arm_(lr=1e-3))
    with pytest.raises(CheckpointMismatch, match=r"run\.data_sha256"):
        run(tmp_path, data=counter_blocks(40, seed=2))
    # Checkpoint cadence is not part of the recipe: changing it still resumes.
    _, res = run(tmp_path, arm=arm_(checkpoint_every_steps=3, keep_last_checkpoints=5))
    assert res.resumed_from.name == "step-00000004" and res.completed


# --------------------------------------------------------------------------- cadence and pruning
def test_keep_last_pruning_and_time_based_checkpoints(tmp_path):
    run(tmp_path / "steps", arm=arm_(checkpoint_every_steps=2, keep_last_checkpoints=2))
    assert [s for s, _ in list_checkpoints(tmp_path / "steps" / "checkpoints")] == [10, 12]
    # every step is "due" by time when the interval is a microsecond
    run(
        tmp_path / "time",
        arm=arm_(checkpoint_every_steps=1000, checkpoint_every_minutes=1e-8, keep_last_checkpoints=100),
        stop=3,
    )
    assert [s for s, _ in list_checkpoints(tmp_path / "time" / "checkpoints")] == [1, 2, 3]


# --------------------------------------------------------------------------- format
def test_checkpoint_holds_everything_and_nothing_is_pickled(tmp_path):
    run(tmp_path, constrained=True, stop=5)
    ckpt = tmp_path / "checkpoints" / "step-00000005"
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == [
        "checkpoint.json",
        "model.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
        "rng.safetensors",
        "state.json",
    ]
    assert all(n.endswith((".json", ".safetensors")) for n in names)
    manifest = json.loads((ckpt / "checkpoint.json").read_text())
    assert set(manifest["files"]) == set(names) - {"checkpoint.json"}
    assert manifest["fingerprint"]["config"]["lr"] == 3e-3 and manifest["fingerprint"]["run"]["seed"] == 5
    assert any(k.endswith("parametrizations.weight.original") for k in manifest["fingerprint"]["model"])
    state = json.loads((ckpt / "state.json").read_text())
    assert state["train"]["data_position"] == {"epoch": 0, "index": 40}  # 5 steps x 8 = one epoch
    assert state["train"]["step"] == 5 and len(state["rng"]["python"]["state"]) == 625
    rng = load_file(str(ckpt / "rng.safetensors"))
    assert {"torch_cpu", "data_generator"} <= set(rng)
    opt = json.loads((ckpt / "optimizer.json").read_text())
    assert opt["scheduler"]["last_epoch"] == 5 and opt["scheduler"]["lr_lambdas"][0]["total_steps"] == 12
    model = load_file(str(ckpt / "model.safetensors"))
    assert any(k.endswith("parametrizations.weight.original") for k in model)


def test_optimizer_round_trip_is_exact():
    model = model_(constrained=True, dropout=0.0)
    names = [n for n, _ in model.named_parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    for _ in range(2):
        model(input_ids=HELD_OUT, use_cache=False).logits.sum().backward()
        opt.step(), sched.step(), opt.zero_grad()
    tensors, meta = optimizer_to_safe(opt, names, sched)
    json.dumps(meta)  # the non-tensor part is plain JSON
    clone = model_(constrained=True, dropout=0.0)
    opt2 = torch.optim.AdamW(clone.parameters(), lr=1.0)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 0.5)
    optimizer_from_safe(opt2, names, tensors, meta, sched2)
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for idx in a["state"]:
        for key, value in a["state"][idx].items():
            assert torch.equal(value, b["state"][idx][key])
    assert sched2.state_dict()["last_epoch"] == 2
    with pytest.raises(CheckpointMismatch):
        optimizer_from_safe(opt2, list(reversed(names)), tensors, meta, sched2)


def test_atomic_dir_leaves_nothing_on_failure_and_recovers_an_interrupted_swap(tmp_path):
    target = tmp_path / "best"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "x").write_text("half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(target) as tmp:
        (tmp / "x").write_text("one")
    with pytest.raises(FileExistsError), atomic_dir(target) as tmp:
        pass
    with atomic_dir(target, existing="replace") as tmp:
        (tmp / "x").write_text("two")
    assert (target / "x").read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    target.rename(tmp_path / ".old-best-1234")  # crash between the two renames of a swap
    assert recover_replaced(target) and (target / "x").read_text() == "two"


def test_a_resumed_constrained_run_saves_and_loads_with_the_real_parametrization(tmp_path):
    """The constrained model of the resume tests carries monolm's own `NonNegativeSoftplus`; after
    a resume it is written by `save_constrained` and read back by `load_constrained` still
    parametrized, computing the same function."""
    from monolm.constraint.softplus import NonNegativeSoftplus, constrained_modules, load_constrained, save_constrained

    run(tmp_path, constrained=True, stop=4)
    model, res = run(tmp_path, constrained=True)
    assert res.resumed_from.name == "step-00000004" and res.completed
    assert all(isinstance(m.parametrizations.weight[0], NonNegativeSoftplus) for _, m in constrained_modules(model))
    save_constrained(model, None, tmp_path / "model", spec={"variant": "mlp_in", "init": "abs", "eps": 1e-6})
    loaded = load_constrained(tmp_path / "model")
    assert [n for n, _ in constrained_modules(loaded)] == [n for n, _ in constrained_modules(model)]
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=HELD_OUT).logits, model(input_ids=HELD_OUT).logits)
