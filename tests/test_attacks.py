"""Attacks (UAT, HotFlip): tests that fail if the attacks were wrong.

One small GPT-NeoX is trained once per session (200 steps of 16 x 32 tokens of Python's own
documentation prose, with a byte-level BPE tokenizer of 1000 tokens and an embedding padded to
1024 rows, so 24 rows are unused as in Pythia). Attack settings are small so the whole file
stays well under a minute on an idle 2-core machine.
"""

from __future__ import annotations

import functools
import json
import logging
import random
from pathlib import Path

import pytest
import torch
from scipy.stats import spearmanr

from monolm.attacks import flip_scoring, flip_search, hotflip, trigger_search, typeable, uat, units
from monolm.attacks import scoring as common
from monolm.config import HotFlipConfig, TinyModelConfig, UATConfig
from monolm.data import splits as data_lib
from monolm.models import loading as models

ROWS = 1024
# What the UAT and GCG tests share: two restarts of a 2-token trigger, 8 + 16 texts of 24 tokens,
# gradients over 8 texts at a time, 32 candidate sequences per scoring pass.
TRIGGER_ATTACK = dict(trigger_len=2, restarts=2, n_opt_texts=8, n_eval_texts=16, text_max_tokens=24)
TRIGGER_ATTACK |= dict(grad_batch_size=8, score_batch_size=32)
UAT_CFG = UATConfig(**TRIGGER_ATTACK, top_k=8, max_sweeps=2)
HF_CFG = HotFlipConfig(max_flips=3, top_b=8, n_texts=6, text_max_tokens=20, block_size=2, score_batch_size=32)


@functools.lru_cache(maxsize=1)
def _trained():
    docs = data_lib.embedded_documents()
    random.Random(0).shuffle(docs)
    held, train = docs[:80], docs[80:]
    tok = data_lib.train_bpe_tokenizer(train, 1000)
    model = models.build_tiny_model(TinyModelConfig(vocab_size=1000), tok, seed=0)
    assert model.get_input_embeddings().weight.shape[0] == ROWS > len(tok)
    blocks = data_lib.pack_blocks(data_lib.tokenize(tok, train), 32, tok.eos_token_id)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    steps = 200
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        batch = blocks[torch.randint(len(blocks), (16,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    assert loss.item() < 4.6, "the fixture model did not learn"  # ~6.9 at random init
    return model, tok, data_lib.tokenize(tok, held)


@pytest.fixture(scope="session")
def trained():
    return _trained()


def _opt_eval(held):
    return held[:8], held[8:24]


def _record_masks(monkeypatch):
    """Record (ids, target_mask) of every forward pass that computes a loss (scoring and
    gradients both go through `common._token_losses_from`)."""
    calls = []
    real = common._token_losses_from

    def spy(model, target_mask, labels, **inputs):
        calls.append((labels.detach().cpu().clone(), target_mask.detach().cpu().clone(), inputs.get("attention_mask")))
        return real(model, target_mask, labels, **inputs)

    monkeypatch.setattr(common, "_token_losses_from", spy)
    return calls


# --------------------------------------------------------------------------- vocabulary, masks
def test_allowed_mask_excludes_special_unused_rows_and_extra(trained):
    _, tok, _ = trained
    mask = common.allowed_token_mask(tok, ROWS)
    assert mask.shape == (ROWS,) and mask.dtype == torch.bool
    assert not mask[len(tok) :].any(), "padded embedding rows must never be candidates"
    for special in tok.all_special_ids:
        assert not mask[special]
    assert int(mask.sum()) == len(tok) - len(set(tok.all_special_ids))
    extra = common.allowed_token_mask(tok, ROWS, disallow=[100, 200])
    assert not extra[100] and not extra[200] and int(extra.sum()) == int(mask.sum()) - 2
    strict = common.allowed_token_mask(tok, ROWS, require_roundtrip=True)
    assert not (strict & ~mask).any()
    for i in torch.nonzero(strict).flatten()[:50].tolist():
        assert tok.encode(tok.decode([i]), add_special_tokens=False) == [i]


def test_trigger_batch_scores_only_the_text_tokens(trained):
    _, tok, held = trained
    prefix = common.context_prefix(tok)
    assert prefix == [tok.eos_token_id]
    texts = [held[0][:10], held[1][:7]]
    b = trigger_search.trigger_batch(prefix, [5, 6, 7], texts)
    for row, text in enumerate(texts):
        n_head = len(prefix) + 3
        assert not b.target_mask[row, :n_head].any()
        assert b.target_mask[row, n_head : n_head + len(text)].all()
        assert not b.target_mask[row, n_head + len(text) :].any()  # padding
        assert b.input_ids[row][b.target_mask[row]].tolist() == text
    # without a prefix, the first text token is not scored (nothing predicts it in the clean text)
    assert common.text_target_mask(0, 3, has_prefix=False) == [False, True, True]
    assert common.text_target_mask(2, 2, has_prefix=False) == [False, False, False, True]


# --------------------------------------------------------------------------- objective and scoring
def test_batched_scoring_equals_per_candidate_loop(trained):
    model, _, held = trained
    gen = torch.Generator().manual_seed(1)
    seqs, masks = [], []
    for i in range(23):
        n = int(torch.randint(4, 30, (1,), generator=gen))
        seqs.append(held[i][:n])
        m = (torch.rand(n, generator=gen) < 0.7).tolist()
        m[0] = False
        m[-1] = True
        masks.append(m)
    b = common.pad_batch(seqs, masks)
    assert (b.attention_mask == 0).any(), "the test must exercise padding"
    batched = common.score_candidates_batched(model, b, batch_size=6)
    loop = common.score_candidates_loop(model, b)
    torch.testing.assert_close(batched, loop, atol=2e-5, rtol=1e-5)
    per_tok = common.score_candidates_batched(model, b, batch_size=6, per_token=True)
    torch.testing.assert_close(per_tok, common.score_candidates_loop(model, b, per_token=True), atol=2e-5, rtol=1e-5)
    assert (per_tok[~b.target_mask] == 0).all()
    # the objective is the mean CE of the targets, as a plain HF forward computes it
    row = 3
    ids = torch.tensor(seqs[row])
    logits = model(input_ids=ids[None]).logits[0, :-1]
    ce = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none")
    expected = ce[torch.tensor(masks[row][1:])].mean()
    torch.testing.assert_close(batched[row], expected, atol=2e-5, rtol=1e-5)


def test_scoring_backs_off_on_out_of_memory(trained, monkeypatch, caplog):
    model, _, held = trained
    seqs = [h[:12] for h in held[:10]]
    b = common.pad_batch(seqs, [common.text_target_mask(0, len(s), has_prefix=False) for s in seqs])
    expected = common.score_candidates_loop(model, b)
    real = common.token_losses
    sizes = []

    def limited(model, ids, *args, **kwargs):
        sizes.append(ids.shape[0])
        if ids.shape[0] > 3:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, ids, *args, **kwargs)

    monkeypatch.setattr(common, "token_losses", limited)
    sizer = common.BatchSizer(16)
    with caplog.at_level(logging.WARNING, logger="monolm.attacks"):
        got = common.score_candidates_batched(model, b, batch_size=sizer)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    assert sizer.size == 2 and sizes[:3] == [10, 8, 4] and "halved" in caplog.text

    def broken(model, ids, *args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(common, "token_losses", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):  # not an OOM: never swallowed
        common.score_candidates_batched(model, b, batch_size=4)


@pytest.mark.parametrize("has_prefix", [True, False])
def test_flip_scoring_with_shared_prefix_equals_full_forward_loop(trained, has_prefix):
    """HotFlip's scorer reuses the current text's keys/values before each batch's earliest flip;
    it must give the losses of one full forward pass per candidate, on the same target sets."""
    model, tok, held = trained
    # the installed transformers' name for the cache keyword (renamed in 5.24): the reuse is really on
    assert common.cache_argument(type(model)) in ("cache", "past_key_values")
    allowed = common.allowed_token_mask(tok, ROWS)
    prefix = [tok.eos_token_id] if has_prefix else []
    text = held[5][:30]
    cur = torch.tensor(prefix + text)
    targets = flip_search.base_targets(len(prefix), len(text))
    targets[len(prefix) + 7] = False  # as after an earlier flip at 7
    open_pos = torch.tensor([i for i in range(len(prefix), len(cur)) if i != len(prefix) + 7])
    pos, new = flip_search._random_candidates(cur, open_pos, allowed, 40, torch.Generator().manual_seed(0))
    pos[1], new[1] = len(cur) - 1, 3 if int(cur[-1]) != 3 else 4  # a flip of the last token: nothing after it
    if not has_prefix:
        pos[0] = 0  # a flip of the very first token: no prefix to share
    sizer = common.BatchSizer(6)
    before, after = flip_scoring.score_flips(model, cur, targets, pos, new, sizer=sizer)
    ids = cur.view(1, -1).repeat(len(pos), 1)
    ids[torch.arange(len(pos)), pos] = new
    masks = flip_scoring.flip_target_masks(targets, pos)
    assert not masks[torch.arange(len(pos)), pos].any() and not (masks & ~targets).any()
    ones = torch.ones_like(ids)
    flipped, current = common.TextBatch(ids, ones, masks), common.TextBatch(cur.repeat(len(pos), 1), ones, masks)
    torch.testing.assert_close(after, common.score_candidates_loop(model, flipped), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(before, common.score_candidates_loop(model, current), atol=2e-5, rtol=1e-5)
    assert before.shape == after.shape == (len(pos),)
    if has_prefix:  # out of memory on batches of more than 2 rows: halve and retry, same result
        real_forward = model.forward

        def limited(*args, **kwargs):
            ids = kwargs.get("input_ids")
            if ids is not None and ids.shape[0] > 2:
                raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB")
            return real_forward(*args, **kwargs)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(model, "forward", limited)
            small = common.BatchSizer(6)
            b2, a2 = flip_scoring.score_flips(model, cur, targets, pos, new, sizer=small)
        assert small.size == 1 or small.size == 2
        torch.testing.assert_close(a2, after, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(b2, before)


def test_plan_chunks_covers_candidates_in_bounded_batches():
    pos = [1, 1, 2, 5, 9, 9, 20, 31, 40, 41]
    for max_rows, overhead in ((3, 0), (4, 10), (10, 10**6), (1, 5)):
        ends = flip_scoring.plan_chunks(pos, 50, max_rows, overhead)
        starts = [0] + ends[:-1]
        assert ends[-1] == len(pos) and all(0 < e - s <= max_rows for s, e in zip(starts, ends, strict=True))
    assert flip_scoring.plan_chunks(pos, 50, 10, 10**6) == [10]  # huge per-pass cost: one batch
    # no per-pass cost: a new batch at every new position (equal positions stay together)
    assert flip_scoring.plan_chunks(pos, 50, 10, 0) == [2, 3, 4, 6, 7, 8, 9, 10]


def test_embedding_gradient_is_the_gradient_of_the_masked_objective(trained):
    model, tok, held = trained
    ids = torch.tensor([common.context_prefix(tok) + held[0][:15]])
    tm = torch.tensor([common.text_target_mask(1, 15, has_prefix=True)])
    tm[0, 5] = False
    model.zero_grad(set_to_none=True)
    grad, loss = common.embedding_gradient(model, ids, None, tm)
    assert all(p.grad is None for p in model.parameters()), "no parameter gradients are accumulated"
    assert all(p.requires_grad for p in model.parameters()), "requires_grad flags are restored"
    emb = model.get_input_embeddings()(ids).detach().double()
    direction = torch.randn(emb.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model.double()
    try:
        eps = 1e-4

        def f(e):
            logits = model(inputs_embeds=e).logits[0, :-1]
            ce = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
            return ce[tm[0, 1:]].mean()

        with torch.no_grad():
            numeric = (f(emb + eps * direction) - f(emb - eps * direction)) / (2 * eps)
            torch.testing.assert_close(loss.double(), f(emb).view(1), atol=1e-4, rtol=1e-4)
    finally:
        model.float()
    analytic = (grad.double() * direction).sum()
    assert abs(float(analytic - numeric)) < 1e-3 * max(1.0, abs(float(numeric)))


def test_first_order_scores_rank_exact_loss_increases(trained):
    """The gradient must carry signal about which swaps raise the exact loss: wrong sign, wrong
    position or a wrong objective would break this."""
    model, tok, held = trained
    allowed = common.allowed_token_mask(tok, ROWS)
    E = model.get_input_embeddings().weight.detach()
    prefix = common.context_prefix(tok)
    gen = torch.Generator().manual_seed(0)
    top_gains, random_gains, rhos = [], [], []
    for text in held[30:34]:
        seq = torch.tensor(prefix + text[:24])
        targets = flip_search.base_targets(1, len(seq) - 1)
        grad, _ = common.embedding_gradient(model, seq[None], None, targets[None])
        pos = torch.arange(1, len(seq))
        scores = common.first_order_scores(grad[0, pos], E, allowed, current=seq[pos])
        V = scores.shape[1]
        flat = scores.flatten()
        finite = torch.isfinite(flat).nonzero().flatten()
        sample = finite[torch.randperm(len(finite), generator=gen)[:150]]
        top = torch.topk(flat, 20).indices
        cand = torch.cat([sample, top])
        p, v = pos[cand // V], cand % V
        assert allowed[v].all() and (v != seq[p]).all()
        ids = seq.repeat(len(cand) + 1, 1)
        ids[torch.arange(1, len(cand) + 1), p] = v
        tm = targets.repeat(len(cand) + 1, 1)
        tm[torch.arange(1, len(cand) + 1), p] = False
        tok_losses = common.score_candidates_batched(
            model, common.TextBatch(ids, torch.ones_like(ids), tm), per_token=True
        )
        gains = common.masked_mean(tok_losses[1:], tm[1:]) - common.masked_mean(
            tok_losses[0].expand(len(cand), -1), tm[1:]
        )
        random_gains.append(gains[:150].mean())
        top_gains.append(gains[150:].mean())
        rhos.append(spearmanr(flat[sample].numpy(), gains[:150].numpy())[0])
    assert torch.stack(top_gains).mean() > 1.3 * torch.stack(random_gains).mean()
    assert sum(rhos) / len(rhos) > 0.15


# --------------------------------------------------------------------------- UAT
def run_attack(trained, attack, cfg, out: Path, **kw):
    """`attack.run` (uat, gcg) on the trained model's optimisation and evaluation texts, seed 3."""
    model, tok, held = trained
    return attack.run(model, tok, *_opt_eval(held), cfg, seed=3, out_dir=out, **kw)


def spied_run(trained, attack, cfg, out: Path, **kw):
    """`run_attack` with every scored target mask recorded: (result, calls)."""
    with pytest.MonkeyPatch.context() as mp:
        calls = _record_masks(mp)
        return run_attack(trained, attack, cfg, out, **kw), calls


def scored_rows(calls):
    """Every row of the recorded forward passes (`_record_masks`): (its target mask, its length
    without padding, the token ids it scores)."""
    for ids, tm, am in calls:
        lengths = am.sum(1) if am is not None else torch.full((ids.shape[0],), ids.shape[1])
        for row in range(ids.shape[0]):
            yield tm[row], int(lengths[row]), ids[row][tm[row]].tolist()


@pytest.fixture(scope="session")
def uat_spied(trained, tmp_path_factory):
    """One UAT run with every scored target mask recorded."""
    out = tmp_path_factory.mktemp("uat")
    res, calls = spied_run(trained, uat, UAT_CFG, out, progress=False)
    return res, calls, out


def test_uat_raises_held_out_loss_of_a_trained_model(trained, uat_spied):
    _, _, held = trained
    res, _, out = uat_spied
    e = res["eval"]
    assert e["attacked_loss"]["mean"] > e["clean_loss"]["mean"]
    assert e["abs_increase"]["ci_low"] > 0
    assert res["opt"]["attacked_loss"] > res["opt"]["clean_loss"]
    n = len(_opt_eval(held)[1])
    assert sum(a > c for a, c in zip(res["per_text"]["attacked"], res["per_text"]["clean"], strict=True)) > n * 0.7
    assert list(e)[:2] == ["n_texts", "abs_increase"], "absolute increase is reported first"
    trig = json.loads((out / "triggers.json").read_text())
    assert trig["best"]["trigger_ids"] == res["trigger_ids"] and len(trig["restarts"]) == UAT_CFG.restarts
    best = max(trig["restarts"], key=lambda r: r["opt_loss"])
    assert best["trigger_ids"] == res["trigger_ids"] and best["opt_loss"] == res["opt"]["attacked_loss"]
    assert json.loads((out / "uat_results.json").read_text()) == res


def test_uat_never_scores_trigger_or_prefix_tokens(trained, uat_spied):
    _, _, held = trained
    _, calls, _ = uat_spied
    opt, ev = _opt_eval(held)
    texts = {tuple(t[: UAT_CFG.text_max_tokens]) for t in opt + ev}
    P, L = 1, UAT_CFG.trigger_len
    heads = set()
    for tm, n, scored in scored_rows(calls):
        head = n - len(scored)
        heads.add(head)
        assert head in (P, P + L), "only prefix/trigger positions may be unscored"
        assert tm[head:n].all() and not tm[:head].any() and not tm[n:].any()
        assert tuple(scored) in texts, "a scored token is not an original text token"
    assert heads == {P, P + L}, "both clean and attacked rows were checked"
    assert sum(ids.shape[0] for ids, _, _ in calls) > 300


def test_uat_same_seed_resume_and_disallowed_tokens(trained, uat_spied, tmp_path, caplog):
    """Same seed -> identical triggers; killed after one restart + re-run -> identical to the
    uninterrupted run; a corrupt unit is recomputed; banned tokens never appear."""
    model, tok, held = trained
    opt, ev = _opt_eval(held)
    full, _, full_dir = uat_spied
    part = uat.run(model, tok, opt, ev, UAT_CFG, seed=3, out_dir=tmp_path / "res", progress=False, max_units=1)
    assert part["complete"] is False
    assert sorted(p.name for p in (tmp_path / "res" / "units").iterdir()) == ["uat-0000.json"]
    assert not (tmp_path / "res" / "uat_results.json").exists()
    resumed = uat.run(model, tok, opt, ev, UAT_CFG, seed=3, out_dir=tmp_path / "res", progress=False)
    assert resumed == full
    for name in ("triggers.json", "uat_results.json"):
        assert (tmp_path / "res" / name).read_text() == (full_dir / name).read_text()
    # a truncated unit is detected, recomputed with a warning, and the result is unchanged
    unit = units.unit_path(tmp_path / "res", "uat", 1)
    unit.write_bytes(unit.read_bytes()[:-40])
    with caplog.at_level(logging.WARNING, logger="monolm.attacks"):
        again = uat.run(model, tok, opt, ev, UAT_CFG, seed=3, out_dir=tmp_path / "res", progress=False)
    assert "corrupt" in caplog.text and again == full
    # a unit computed with another config is not reused
    allowed = common.allowed_token_mask(tok, ROWS) & typeable.ascii_mask(tok, ROWS)
    opt = common.truncate(opt, UAT_CFG.text_max_tokens)
    key = uat.run_key(model, opt, UAT_CFG, seed=3, prefix=[tok.eos_token_id], allowed=allowed)
    other = uat.run_key(
        model, opt, UAT_CFG.model_copy(update={"top_k": 4}), seed=3, prefix=[tok.eos_token_id], allowed=allowed
    )
    assert units.read_unit(tmp_path / "res", "uat", 0, key) is not None
    assert units.read_unit(tmp_path / "res", "uat", 0, other) is None
    # ban every token the free run used, plus a random third of the vocabulary
    trig = json.loads((full_dir / "triggers.json").read_text())
    used = {t for r in trig["restarts"] for t in r["trigger_ids"] + r["initial_trigger_ids"]}
    banned = used | set(random.Random(0).sample(range(len(tok)), len(tok) // 3))
    allowed = common.allowed_token_mask(tok, ROWS, disallow=sorted(banned))
    d = uat.run(model, tok, opt, ev, UAT_CFG, seed=3, out_dir=tmp_path / "ban", allowed=allowed, progress=False)
    assert d["n_allowed_tokens"] == int((allowed & typeable.ascii_mask(tok, ROWS)).sum())
    td = json.loads((tmp_path / "ban" / "triggers.json").read_text())
    for r in td["restarts"]:
        for t in r["trigger_ids"] + r["initial_trigger_ids"]:
            assert allowed[t] and t not in banned and t < len(tok) and t not in tok.all_special_ids
        steps = json.loads(units.unit_path(tmp_path / "ban", "uat", r["restart"]).read_text())["payload"]["steps"]
        assert all(allowed[s["token_after"]] for s in steps)


def test_uat_triggers_are_typeable_text_as_gcg_s(trained, uat_spied):
    """UAT shares GCG's threat model: by default every trigger it tries or keeps is printable
    ASCII without special tokens and survives decode/re-encode."""
    _, tok, _ = trained
    _, _, out = uat_spied
    keep = typeable.survives_roundtrip(tok)
    trig = json.loads((out / "triggers.json").read_text())
    for r in trig["restarts"]:
        for ids in (r["initial_trigger_ids"], r["trigger_ids"]):
            assert keep(ids) and not set(ids) & set(tok.all_special_ids)
            assert all(tok.decode([i]).isascii() and tok.decode([i]).isprintable() for i in ids)
        steps = json.loads(units.unit_path(out, "uat", r["restart"]).read_text())["payload"]["steps"]
        assert any(s["accepted"] for s in steps), "the filtered search still moves"


def test_uat_replacements_are_the_top_k_that_pass_the_filter():
    """With a filter, position p's candidates are the k best-scored tokens whose trigger passes it,
    in score order, never a disallowed (-inf) token; without, plain top-k."""
    scores = torch.tensor([0.1, 5.0, 4.0, float("-inf"), 3.0, 2.0, 1.0])
    trigger = torch.tensor([0, 0, 0])
    odd_only = lambda ids: ids[1] % 2 == 1  # noqa: E731 - keeps triggers whose position 1 is odd
    picked = trigger_search._top_replacements(scores, trigger, 1, 2, odd_only)
    assert picked.tolist() == [1, 5]
    assert trigger_search._top_replacements(scores, trigger, 1, 9, odd_only).tolist() == [1, 5]
    assert trigger_search._top_replacements(scores, trigger, 1, 2, None).tolist() == [1, 2]
    assert trigger.tolist() == [0, 0, 0], "the current trigger is not modified"


def test_uat_without_the_filter_is_the_token_level_search(trained, uat_spied, tmp_path):
    """`filter_ids: false, allow_non_ascii: true` is Wallace et al.'s token-level UAT: the whole
    allowed vocabulary, the plain top-k; it may keep a trigger no text produces."""
    model, tok, held = trained
    opt, ev = _opt_eval(held)
    cfg = UAT_CFG.model_copy(update={"filter_ids": False, "allow_non_ascii": True})
    free = uat.run(model, tok, opt, ev, cfg, seed=3, out_dir=tmp_path, progress=False)
    assert free["n_allowed_tokens"] == int(common.allowed_token_mask(tok, ROWS).sum())
    assert free["n_allowed_tokens"] > uat_spied[0]["n_allowed_tokens"]
    assert free["opt"]["attacked_loss"] > free["opt"]["clean_loss"]


def test_uat_refuses_overlapping_eval_texts(trained, tmp_path):
    model, tok, held = trained
    with pytest.raises(ValueError, match="held-out"):
        uat.run(model, tok, held[:8], held[4:12], UAT_CFG, seed=1, out_dir=tmp_path, progress=False)


def test_uat_transfer_matrix(trained, uat_spied):
    model, tok, held = trained
    _, ev = _opt_eval(held)
    res = uat_spied[0]
    untrained = models.build_tiny_model(TinyModelConfig(vocab_size=1000), tok, seed=1).eval()
    trig_other = [int(t) for t in torch.nonzero(common.allowed_token_mask(tok, ROWS)).flatten()[:2]]
    m = uat.transfer_matrix(
        {"trained": model, "untrained": untrained},
        {"trained": res["trigger_ids"], "other": trig_other},
        ev,
        prefix=[tok.eos_token_id],
        seed=3,
        text_max_tokens=UAT_CFG.text_max_tokens,
    )
    assert set(m["cells"]) == {"trained", "other"} and set(m["cells"]["other"]) == {"trained", "untrained"}
    same = m["per_text"]["trained"]["trained"]
    torch.testing.assert_close(torch.tensor(same["attacked"]), torch.tensor(res["per_text"]["attacked"]))
    torch.testing.assert_close(torch.tensor(same["clean"]), torch.tensor(res["per_text"]["clean"]))
    # an untrained model's clean loss is near log(vocab): the matrix really evaluated each model
    assert m["cells"]["trained"]["untrained"]["clean_loss"]["mean"] > 6.0


# --------------------------------------------------------------------------- HotFlip
def test_hotflip_never_scores_flipped_positions_and_keeps_only_exact_gains(trained, monkeypatch):
    model, tok, held = trained
    allowed = common.allowed_token_mask(tok, ROWS)
    prefix = common.context_prefix(tok)
    n_differing = 0
    for i, text in enumerate(held[40:43]):
        text = text[: HF_CFG.text_max_tokens]
        orig = torch.tensor(prefix + text)
        calls = _record_masks(monkeypatch)
        for method in ("gradient", "control"):
            setup = common.AttackSetup(model, prefix, common.BatchSizer(HF_CFG.score_batch_size))
            rec = flip_search.attack_text(
                setup, text, HF_CFG, allowed=allowed, method=method, gen=torch.Generator().manual_seed(i)
            )
            assert rec["flips_used"] >= 1
            assert len(set(rec["positions"])) == rec["flips_used"]
            assert all(allowed[t] for t in rec["new_ids"])
            # replay the trajectory: each accepted flip raised the exact loss on the same targets
            cur, targets = orig.clone(), flip_search.base_targets(1, len(text))
            for step in rec["trajectory"]:
                p = step["position"] + 1
                targets = targets.clone()
                targets[p] = False
                nxt = cur.clone()
                nxt[p] = step["new_id"]
                ids = torch.stack([cur, nxt])
                pair = common.TextBatch(ids, torch.ones_like(ids), targets.repeat(2, 1))
                ref = common.score_candidates_loop(model, pair)
                torch.testing.assert_close(
                    ref, torch.tensor([step["loss_before"], step["loss_after"]]), atol=2e-5, rtol=1e-5
                )
                assert step["loss_after"] > step["loss_before"]
                cur = nxt
            assert rec["n_targets"] == int(targets.sum())
        monkeypatch.undo()
        for ids, tm, _ in calls:
            assert ids.shape[1] == len(orig)
            for row in range(ids.shape[0]):
                differs = ids[row] != orig
                n_differing += int(differs.sum())
                assert not (tm[row] & differs).any(), "a flipped position was scored"
                assert not tm[row, 0], "the prefix is never scored"
    assert n_differing > 0


@pytest.fixture(scope="session")
def hotflip_full(trained, tmp_path_factory):
    model, tok, held = trained
    out = tmp_path_factory.mktemp("hotflip")
    res = hotflip.run(model, tok, held[40:46], HF_CFG, seed=11, out_dir=out, progress=False)
    return res, out


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_hotflip_run_outputs(trained, hotflip_full):
    _, _, held = trained
    full, out = hotflip_full
    texts = held[40:46]
    g, c = full["gradient"], full["control"]
    assert g["abs_increase"]["mean"] > 0 and g["abs_increase"]["ci_low"] > 0
    assert c["abs_increase"]["mean"] > 0
    assert list(g)[:2] == ["n_texts", "abs_increase"]
    assert sum(g["flips_histogram"].values()) == len(texts) and full["gradient_vs_control"]["n"] == len(texts)
    exs, ctrl = _jsonl(out / "hotflip_examples.jsonl"), _jsonl(out / "hotflip_control_examples.jsonl")
    assert [e["index"] for e in exs] == list(range(len(texts))) and all(e["method"] == "gradient" for e in exs)
    assert all(e["method"] == "control" for e in ctrl)
    assert exs[0]["text_ids"] == texts[0][: HF_CFG.text_max_tokens]
    for e in exs + ctrl:
        assert e["flips_used"] == len(e["positions"]) == len(e["new_ids"]) <= HF_CFG.max_flips
        assert e["n_targets"] == len(e["text_ids"]) - e["flips_used"]
    assert json.loads((out / "hotflip_results.json").read_text()) == full


def test_hotflip_same_seed_resume_and_disallowed_tokens(trained, hotflip_full, tmp_path, caplog):
    """Same seed -> identical flips; killed after 2 units + re-run -> identical to the
    uninterrupted run; a corrupt unit is recomputed; banned tokens never appear."""
    model, tok, held = trained
    texts = held[40:46]
    full, full_dir = hotflip_full
    part = hotflip.run(model, tok, texts, HF_CFG, seed=11, out_dir=tmp_path / "res", progress=False, max_units=2)
    assert part["complete"] is False and len(list((tmp_path / "res" / "units").iterdir())) == 2
    resumed = hotflip.run(model, tok, texts, HF_CFG, seed=11, out_dir=tmp_path / "res", progress=False, max_units=4)
    assert resumed == full
    for name in ("hotflip_examples.jsonl", "hotflip_control_examples.jsonl", "hotflip_results.json"):
        assert (tmp_path / "res" / name).read_text() == (full_dir / name).read_text()
    units.unit_path(tmp_path / "res", "hotflip_control", 1).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="monolm.attacks"):
        assert hotflip.run(model, tok, texts, HF_CFG, seed=11, out_dir=tmp_path / "res", progress=False) == full
    assert "corrupt" in caplog.text
    # the control is seeded: another seed draws other candidates; the gradient attack has no randomness
    small = HF_CFG.model_copy(update={"n_texts": 2})
    hotflip.run(model, tok, texts, small, seed=12, out_dir=tmp_path / "other", progress=False)
    exs, ctrl = _jsonl(full_dir / "hotflip_examples.jsonl"), _jsonl(full_dir / "hotflip_control_examples.jsonl")
    assert _jsonl(tmp_path / "other" / "hotflip_examples.jsonl") == exs[:2]
    assert [e["new_ids"] for e in _jsonl(tmp_path / "other" / "hotflip_control_examples.jsonl")] != [
        e["new_ids"] for e in ctrl[:2]
    ]
    # disallowed tokens never appear
    banned = {t for e in exs + ctrl for t in e["new_ids"]} | set(random.Random(1).sample(range(len(tok)), 300))
    allowed = common.allowed_token_mask(tok, ROWS, disallow=sorted(banned))
    hotflip.run(
        model,
        tok,
        texts,
        small.model_copy(update={"n_texts": 4}),
        seed=11,
        out_dir=tmp_path / "ban",
        allowed=allowed,
        progress=False,
    )
    used = [
        t
        for name in ("hotflip_examples.jsonl", "hotflip_control_examples.jsonl")
        for e in _jsonl(tmp_path / "ban" / name)
        for t in e["new_ids"]
    ]
    assert used and all(allowed[t] and t not in banned and t < len(tok) for t in used)


def test_hotflip_replay_and_transfer(trained, hotflip_full, tmp_path):
    model, tok, held = trained
    res = hotflip.run(
        model,
        tok,
        held[40:42],
        HF_CFG.model_copy(update={"n_texts": 2}),
        seed=2,
        out_dir=tmp_path,
        progress=False,
        control=False,
    )
    assert res["control"] is None and res["gradient_vs_control"] is None
    assert not (tmp_path / "hotflip_control_examples.jsonl").exists()
    exs = _jsonl(hotflip_full[1] / "hotflip_examples.jsonl")
    replay = hotflip.replay_flips(model, exs, prefix=[tok.eos_token_id])
    torch.testing.assert_close(
        torch.tensor(replay["clean"]), torch.tensor([e["clean_loss"] for e in exs]), atol=2e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        torch.tensor(replay["attacked"]), torch.tensor([e["attacked_loss"] for e in exs]), atol=2e-5, rtol=1e-5
    )
    untrained = models.build_tiny_model(TinyModelConfig(vocab_size=1000), tok, seed=1).eval()
    m = hotflip.transfer_matrix(
        {"trained": model, "untrained": untrained}, {"trained": exs}, prefix=[tok.eos_token_id], seed=2
    )
    assert set(m["cells"]["trained"]) == {"trained", "untrained"}
    assert m["cells"]["trained"]["untrained"]["clean_loss"]["mean"] > 6.0
