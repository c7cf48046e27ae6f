"""Perplexity must equal a naive per-window computation, lm-eval's windowing, and be independent
of batching and padding."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_neox
from transformers import GPTNeoXForCausalLM

from monolm.evaluation import perplexity as evaluation
from monolm.evaluation.perplexity import (
    Window,
    count_words,
    evaluate_models,
    perplexity,
    rolling_windows,
    score_windows,
)

VOCAB = 512
PREFIX = 0  # plays the EOS/BOS role
MAX_POS = 64


def _model(seed: int = 0) -> GPTNeoXForCausalLM:
    # initializer_range 0.2 (not 0.02) so that logits depend strongly on the context: a test that
    # used the wrong context or position would be off by far more than the tolerance.
    return tiny_neox(seed=seed, vocab=VOCAB, max_positions=MAX_POS, initializer_range=0.2).eval()


@pytest.fixture(scope="module")
def model() -> GPTNeoXForCausalLM:
    return _model()


def _docs(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def _naive_nll(model, input_ids: list[int], targets: list[int]) -> float:
    """Sum of -log p(target) read straight off one unpadded forward pass."""
    logits = model(torch.tensor([input_ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    p = len(targets)
    positions = range(len(input_ids) - p, len(input_ids))
    return -sum(float(logp[j, t]) for j, t in zip(positions, targets, strict=True))


# --------------------------------------------------------------------------- windows
def test_windows_match_lm_eval_gold():
    # lm-evaluation-harness tests/test_utils.py::test_get_rolling_token_windows_v1 (context_len=1)
    gold = [
        ([-100, 0, 1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
        ([9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]),
        ([19, 20, 21, 22, 23, 24, 25, 26, 27, 28], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]),
        ([23, 24, 25, 26, 27, 28, 29, 30, 31, 32], [30, 31, 32, 33]),
    ]
    assert rolling_windows(list(range(34)), prefix_token_id=-100, seq_len=10) == gold


@pytest.mark.parametrize("n", [0, 1, 5, 10, 11, 25, 30])
def test_windows_predict_every_token_once_and_fit(n):
    tokens = list(range(100, 100 + n))
    windows = rolling_windows(tokens, prefix_token_id=-1, seq_len=10)
    assert [t for _, tgt in windows for t in tgt] == tokens
    predecessor = {t: t - 1 for t in tokens} | {100: -1}  # what each token is predicted from
    for inp, tgt in windows:
        assert 1 <= len(tgt) <= len(inp) <= 10
        assert inp[-len(tgt) :] == [predecessor[t] for t in tgt]
    if n:
        assert windows[0][0][0] == -1  # first token predicted from the prefix


def test_count_words_is_lm_eval_split():
    assert count_words("a b  c") == 3
    assert count_words(" a b\n") == 4  # lm-eval counts the empty edges too


# --------------------------------------------------------------------------- against a reference
def test_short_doc_matches_naive_logits(model):
    doc = _docs([20])[0]
    out = perplexity(model, [doc], seq_len=32, batch_size=4, prefix_token_id=PREFIX, progress=False)
    ref = _naive_nll(model, [PREFIX, *doc[:-1]], doc)
    assert out["tokens"] == len(doc) == 20
    assert out["docs"] == 1
    assert out["loss"] * out["tokens"] == pytest.approx(ref, rel=1e-5)
    assert out["token_perplexity"] == pytest.approx(math.exp(ref / 20), rel=1e-5)


def test_long_doc_windowed_like_lm_eval(model):
    seq_len = 16
    doc = _docs([16 * 2 + 5])[0]  # two full windows and a short last one with extra context
    out = perplexity(
        model, [doc], seq_len=seq_len, batch_size=3, prefix_token_id=PREFIX, progress=False, return_per_doc=True
    )
    # reference: windows written out by hand from lm-eval's definition, one unpadded forward each
    ref = (
        _naive_nll(model, [PREFIX, *doc[:15]], doc[:16])
        + _naive_nll(model, doc[15:31], doc[16:32])
        + _naive_nll(model, doc[20:36], doc[32:37])  # 16 inputs ending just before the last target
    )
    assert out["tokens"] == 37
    assert out["per_doc"] == [{"nll": pytest.approx(ref, rel=1e-5), "tokens": 37}]
    assert out["loss"] == pytest.approx(ref / 37, rel=1e-5)
    # the reference is sensitive: scoring the last block without its extra context differs
    no_context = (
        _naive_nll(model, [PREFIX, *doc[:15]], doc[:16])
        + _naive_nll(model, doc[15:31], doc[16:32])
        + _naive_nll(model, doc[31:36], doc[32:37])
    )
    assert abs(no_context - ref) > 1e-3


def test_text_metrics_follow_lm_eval_formulas(model):
    texts = ["Hello world, this is a text.", "Zweite Ära — naïve bytes ✓"]
    docs = _docs([12, 30])
    out = perplexity(model, docs, seq_len=16, batch_size=2, prefix_token_id=PREFIX, texts=texts, progress=False)
    total = out["loss"] * out["tokens"]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert n_bytes > sum(len(t) for t in texts)  # really UTF-8 bytes, not characters
    words = sum(len(t.split()) for t in texts)
    assert out["tokens"] == 42
    assert out["word_perplexity"] == pytest.approx(math.exp(total / words))
    assert out["byte_perplexity"] == pytest.approx(math.exp(total / n_bytes))
    assert out["bits_per_byte"] == pytest.approx(total / n_bytes / math.log(2))
    without = perplexity(model, docs, seq_len=16, batch_size=2, prefix_token_id=PREFIX, progress=False)
    assert "bits_per_byte" not in without and "word_perplexity" not in without
    with pytest.raises(ValueError, match="texts"):
        perplexity(model, docs, seq_len=16, batch_size=2, prefix_token_id=PREFIX, texts=texts[:1], progress=False)


# --------------------------------------------------------------------------- batching and padding
def test_batched_equals_one_by_one(model):
    docs = _docs([3, 40, 17, 1, 64, 9, 33, 0, 50])
    kw = dict(seq_len=32, prefix_token_id=PREFIX, progress=False, return_per_doc=True)
    one = perplexity(model, docs, batch_size=1, **kw)
    many = perplexity(model, docs, batch_size=5, **kw)
    assert one["tokens"] == many["tokens"] == sum(map(len, docs))
    assert many["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-6)
    for a, b in zip(one["per_doc"], many["per_doc"], strict=True):
        assert b["tokens"] == a["tokens"]
        assert b["nll"] == pytest.approx(a["nll"], rel=1e-5, abs=1e-5)
    assert one["per_doc"][7] == {"nll": 0.0, "tokens": 0}  # an empty document predicts nothing


def test_padding_width_and_pad_token_do_not_matter(model):
    docs = _docs([5, 12, 30])
    windows = [Window(i, (PREFIX, *d[:-1]), tuple(d)) for i, d in enumerate(docs)]
    device = torch.device("cpu")
    tight = score_windows(model, windows, device=device, pad_token_id=PREFIX)
    wide = score_windows(model, windows, device=device, pad_token_id=PREFIX, pad_to=MAX_POS)
    other_pad = score_windows(model, windows, device=device, pad_token_id=VOCAB - 1, pad_to=45)
    alone = [score_windows(model, [w], device=device)[0] for w in windows]
    for got in (wide, other_pad, alone):
        assert got == pytest.approx(tight, rel=1e-5)
    with pytest.raises(ValueError, match="pad_to"):
        score_windows(model, windows, device=device, pad_to=10)


def test_windows_sorted_longest_first(model, monkeypatch):
    seen: list[list[int]] = []
    real = evaluation.score_windows

    def spy(m, batch, **kw):
        seen.append([len(w.input_ids) for w in batch])
        return real(m, batch, **kw)

    monkeypatch.setattr(evaluation, "score_windows", spy)
    perplexity(model, _docs([4, 30, 9, 20, 2]), seq_len=32, batch_size=2, prefix_token_id=PREFIX, progress=False)
    flat = [n for batch in seen for n in batch]
    assert flat == sorted(flat, reverse=True) == [30, 20, 9, 4, 2]
    assert [len(b) for b in seen] == [2, 2, 1]


def test_out_of_memory_halves_the_batch(model, monkeypatch):
    real = evaluation.score_windows
    sizes: list[int] = []

    def small_gpu(m, batch, **kw):
        sizes.append(len(batch))
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real(m, batch, **kw)

    docs = _docs([10, 11, 12, 13, 14])
    ref = perplexity(model, docs, seq_len=32, batch_size=1, prefix_token_id=PREFIX, progress=False)
    monkeypatch.setattr(evaluation, "score_windows", small_gpu)
    got = perplexity(model, docs, seq_len=32, batch_size=8, prefix_token_id=PREFIX, progress=False)
    assert sizes[:3] == [5, 2, 2]
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)


def test_rejects_seq_len_beyond_model_and_empty_input(model):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        perplexity(model, _docs([5]), seq_len=MAX_POS + 1, batch_size=1, prefix_token_id=PREFIX, progress=False)
    with pytest.raises(ValueError, match="no tokens"):
        perplexity(model, [[]], seq_len=8, batch_size=1, prefix_token_id=PREFIX, progress=False)


def test_restores_training_mode(model):
    model.train()
    try:
        perplexity(model, _docs([6]), seq_len=8, batch_size=1, prefix_token_id=PREFIX, progress=False)
        assert model.training
    finally:
        model.eval()


# --------------------------------------------------------------------------- several models
def test_evaluate_models_same_docs_modules_and_loaders(model):
    docs = _docs([20, 7])
    texts = ["one two three", "four five"]
    loaded: list[str] = []

    def loader():
        loaded.append("other")
        return _model(seed=3)

    out = evaluate_models(
        {"base": model, "other": loader},
        docs,
        seq_len=16,
        batch_size=2,
        prefix_token_id=PREFIX,
        texts=texts,
        device="cpu",
        progress=False,
    )
    assert list(out) == ["base", "other"] and loaded == ["other"]
    assert out["base"]["tokens"] == out["other"]["tokens"] == 27
    direct = perplexity(model, docs, seq_len=16, batch_size=2, prefix_token_id=PREFIX, texts=texts, progress=False)
    assert out["base"]["loss"] == pytest.approx(direct["loss"], rel=1e-6)
    assert out["other"]["loss"] != pytest.approx(out["base"]["loss"], rel=1e-3)  # really another model
    with pytest.raises(TypeError, match="bad"):
        evaluate_models(
            {"bad": lambda: "not a model"}, docs, seq_len=16, batch_size=2, prefix_token_id=PREFIX, progress=False
        )
