"""Splits are deterministic, disjoint and held out; local Pile-format files load; bad text is refused."""

import json

import pytest
import torch

from monolm import data
from monolm.config import DataConfig


def test_embedded_corpus_is_real_prose():
    docs = data.embedded_documents()
    assert len(docs) > 200 and sum(map(len, docs)) > 300_000
    assert all(len(d) >= 200 for d in docs)


def test_splits_deterministic_per_seed_and_disjoint():
    cfg = DataConfig(source="embedded", n_eval_docs=30, n_attack_docs=40)
    a, b, c = data.load_splits(cfg, 42), data.load_splits(cfg, 42), data.load_splits(cfg, 7)
    assert a == b and a != c
    for s in (a, c):
        train, ev, at = set(s.train), set(s.eval), set(s.attack)
        assert not (train & ev) and not (train & at) and not (ev & at)
        assert len(s.eval) == 30 and len(s.attack) == 40


def _write(path, texts, meta=True):
    with open(path, "w", encoding="utf-8") as fh:
        for t in texts:
            fh.write(json.dumps({"text": t, "meta": {"pile_set_name": "Pile-CC"}} if meta else {"text": t}) + "\n")


def test_local_pile_format_splits(tmp_path):
    docs = data.embedded_documents()
    _write(tmp_path / "train.jsonl", docs[:100])
    _write(tmp_path / "validation.jsonl", docs[100:130] + docs[:3])  # 3 leaked train docs
    _write(tmp_path / "test.jsonl", docs[130:170])
    cfg = DataConfig(source="local", dataset=str(tmp_path), n_train_docs=1000, n_eval_docs=50, n_attack_docs=50)
    s = data.load_splits(cfg, 1)
    assert len(s.train) == 100 and len(s.attack) == 40
    assert len(s.eval) == 30 and not set(s.eval) & set(s.train)  # the leaked ones were dropped


def test_local_single_file_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = data.embedded_documents()[:120]
    pq.write_table(pa.table({"text": docs}), tmp_path / "all.parquet")
    cfg = DataConfig(source="local", dataset=str(tmp_path / "all.parquet"), n_eval_docs=10, n_attack_docs=10)
    s = data.load_splits(cfg, 3)
    assert len(s.eval) == 10 and not set(s.eval) & set(s.train)


def test_non_utf8_and_missing_field_and_empty_are_refused(tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_bytes(b'{"text": "ok ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(data.DataError, match=r"train.jsonl:2: not valid UTF-8"):
        data.read_jsonl_texts(bad)
    bad.write_text('{"content": "x"}\n')
    with pytest.raises(data.DataError, match="no field 'text'"):
        data.read_jsonl_texts(bad)
    short = tmp_path / "short.jsonl"
    _write(short, ["too short"] * 50)
    with pytest.raises(data.DataError, match="corpus too small"):
        data.load_splits(DataConfig(source="local", dataset=str(short)), 0)
    with pytest.raises(data.DataError, match="no such file"):
        data.load_splits(DataConfig(source="local", dataset=str(tmp_path / "nope")), 0)


def test_tokenizer_and_packing():
    docs = data.embedded_documents()[:40]
    tok = data.train_bpe_tokenizer(docs, 600)
    assert len(tok) == 600 and tok.eos_token == "<|endoftext|>"
    ids = data.tokenize(tok, docs)
    assert tok.decode(ids[0]) == docs[0]  # byte-level BPE round-trips exactly
    blocks = data.pack_blocks(ids, 64, tok.eos_token_id)
    flat = [t for d in ids for t in (*d, tok.eos_token_id)]
    assert blocks.shape[1] == 64 and torch.equal(blocks.flatten(), torch.tensor(flat[: blocks.numel()]))
    with pytest.raises(data.DataError, match="too short"):
        data.pack_blocks([[1, 2]], 64, 0)
