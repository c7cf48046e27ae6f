"""Splits are deterministic, disjoint and held out; local Pile-format files load; bad text is refused."""

import json

import pytest
import torch

from monolm.config import DataConfig
from monolm.data import splits as data


def test_embedded_corpus_is_real_prose():
    docs = data.embedded_documents()
    assert len(docs) > 200 and sum(map(len, docs)) > 300_000
    assert all(len(d) >= 200 for d in docs)


def test_embedded_paragraphs_occur_once():
    from monolm.data.contamination import paragraphs

    seen = [p for doc in data.embedded_documents() for p in paragraphs(doc)]
    assert len(seen) == len(set(seen))  # topics repeat each other's paragraphs; the corpus does not


def _hashes(docs):
    from monolm.data.contamination import doc_hash

    return {doc_hash(t) for t in docs}


def assert_disjoint(s: data.Splits):
    parts = {name: _hashes(docs) for name, docs in s.as_dict().items()}
    assert all(parts.values())
    names = list(parts)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not parts[a] & parts[b], (a, b)


def test_splits_deterministic_per_seed_and_disjoint():
    cfg = DataConfig(source="embedded", n_val_docs=20, n_test_docs=30, n_attack_docs=40)
    a, b, c = data.load_splits(cfg, 42), data.load_splits(cfg, 42), data.load_splits(cfg, 7)
    assert a == b and a != c
    for s in (a, c):
        assert_disjoint(s)
        assert 0 < len(s.validation) <= 20 and 0 < len(s.test) <= 30 and 0 < len(s.attack) <= 40


def test_embedded_carve_shares_no_paragraph_between_parts():
    from monolm.data.contamination import paragraphs

    s = data.load_splits(DataConfig(source="embedded", n_val_docs=24, n_test_docs=40, n_attack_docs=48), 42)
    owner = {}
    for name, docs in s.as_dict().items():
        for doc in docs:
            for p in paragraphs(doc):
                assert owner.setdefault(p, name) == name, (p[:60], owner[p], name)


def _write(path, texts, meta=True):
    with open(path, "w", encoding="utf-8") as fh:
        for t in texts:
            fh.write(json.dumps({"text": t, "meta": {"pile_set_name": "Pile-CC"}} if meta else {"text": t}) + "\n")


def test_local_pile_format_splits(tmp_path):
    docs = data.embedded_documents()
    _write(tmp_path / "train.jsonl", docs[:100])
    _write(tmp_path / "validation.jsonl", docs[100:130] + docs[:3])  # 3 leaked train docs
    _write(tmp_path / "test.jsonl", docs[130:200])
    cfg = DataConfig(
        source="local", dataset=str(tmp_path), n_train_docs=1000, n_val_docs=50, n_test_docs=30, n_attack_docs=40
    )
    s, report = data.prepare_splits(cfg, 1)
    assert len(s.train) == 100 and len(s.validation) <= 30 and not set(s.validation) & set(s.train)
    assert report["parts"]["validation"]["exact_duplicates"] == 3  # the leaked ones were dropped
    assert len(s.test) + len(s.attack) <= 70  # both carved from the one test split, disjointly
    assert_disjoint(s)


def test_local_single_file_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = data.embedded_documents()[:120]
    pq.write_table(pa.table({"text": docs}), tmp_path / "all.parquet")
    cfg = DataConfig(
        source="local", dataset=str(tmp_path / "all.parquet"), n_val_docs=10, n_test_docs=10, n_attack_docs=10
    )
    s = data.load_splits(cfg, 3)
    assert 0 < len(s.validation) <= 10 and len(s.train) == 90
    assert_disjoint(s)


def _planted(tmp_path, copy):
    """A local dataset whose validation split holds one document built around `copy(train_doc)`."""
    docs = data.embedded_documents()
    train, held = docs[:120], docs[120:200]
    planted = held[0].split("\n\n")[0] + "\n\n" + copy(train[5]) + "\n\n" + held[1]
    _write(tmp_path / "train.jsonl", train)
    _write(tmp_path / "validation.jsonl", [planted, *held[2:40]])
    _write(tmp_path / "test.jsonl", held[40:])
    return planted


def _longest_paragraph(text):
    return max(text.split("\n\n"), key=len)


@pytest.mark.parametrize(
    "copy, paragraph_hit",
    [
        (_longest_paragraph, True),  # a verbatim paragraph
        (lambda t: _longest_paragraph(t).replace(" the ", " a ", 1), False),  # edited: only n-grams match
    ],
)
def test_planted_near_duplicate_is_caught_and_reported(tmp_path, copy, paragraph_hit):
    planted = _planted(tmp_path, copy)
    cfg = DataConfig(source="local", dataset=str(tmp_path), n_val_docs=20, n_test_docs=10, n_attack_docs=10)
    s, report = data.prepare_splits(cfg, 0)
    assert planted not in s.validation
    val = report["parts"]["validation"]
    assert val["contaminated"] == 1 and val["candidates"] >= 21 and val["contamination_rate"] > 0
    assert val["with_duplicated_paragraph"] == int(paragraph_hit)
    assert report["parts"]["test"]["contaminated"] == 0
    failing = cfg.model_copy(update={"contamination": cfg.contamination.model_copy(update={"action": "fail"})})
    with pytest.raises(data.DataError, match=r"1 of \d+ validation documents overlap train"):
        data.prepare_splits(failing, 0)


def test_selection_and_test_documents_are_disjoint_in_every_preset(tmp_path):
    """tiny (embedded carve), a local directory, a local file, and quick/full (the hub code path,
    streamed by `datasets` from a local stand-in directory: no network)."""
    from monolm.config import load_config

    docs = data.embedded_documents()
    _write(tmp_path / "train.jsonl", docs[:150])
    _write(tmp_path / "validation.jsonl", docs[150:200] + docs[:5])
    _write(tmp_path / "test.jsonl", docs[200:] + docs[150:155])  # shares documents with validation
    _write(tmp_path / "all.jsonl", docs)
    sizes = ["data.n_train_docs=150", "data.n_val_docs=20", "data.n_test_docs=30", "data.n_attack_docs=200"]
    configs = {
        "tiny": load_config("tiny"),
        "tiny, local directory": load_config("tiny", sets=["data.source=local", f"data.dataset={tmp_path}", *sizes]),
        "tiny, local file": load_config("tiny", sets=["data.source=local", f"data.dataset={tmp_path / 'all.jsonl'}"]),
        **{p: load_config(p, sets=[f"data.dataset={tmp_path}", *sizes]) for p in ("quick", "full")},
    }
    for name, cfg in configs.items():
        s = data.load_splits(cfg.data, 42, cache_dir=tmp_path / "hf")
        assert_disjoint(s)
        selection = _hashes(s.validation[: cfg.training.common.eval_max_docs])
        reported = _hashes(s.test[: cfg.evaluation.max_docs])
        assert selection and reported and not selection & reported, name


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
    with pytest.raises(data.DataError, match="data.n_val_docs \\+ data.n_test_docs \\+ data.n_attack_docs = 1100"):
        data.load_splits(DataConfig(source="embedded"), 0)  # the full run's counts from a small corpus
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
