"""The near-duplicate check: what it measures on known overlaps, and the verification records of
stage 0, which must be able to fail."""

import pytest

from monolm.config.schema import ContaminationConfig
from monolm.data import splits as data
from monolm.data.contamination import Index, paragraphs, verify_parts

CFG = ContaminationConfig()


@pytest.fixture(scope="module")
def docs():
    return data.embedded_documents()


def test_overlap_of_known_texts(docs):
    index = Index(CFG)
    index.add(docs[:50])
    same = index.measure(docs[3])
    assert same.ngram_share == 1.0 and same.paragraph_share == 1.0 and same.contaminated(CFG)
    unrelated = index.measure("Completely unrelated words about gardening, tomatoes and rain in spring. " * 3)
    assert unrelated.ngram_share == 0.0 and unrelated.duplicated_paragraphs == 0 and not unrelated.contaminated(CFG)
    short = index.measure("too few words")
    assert short.n_ngrams == 0 and short.ngram_share == 0.0


def test_one_copied_paragraph_in_a_new_document(docs):
    index = Index(CFG)
    index.add(docs[:50])
    copied = max(paragraphs(docs[10]), key=len)
    fresh = docs[200]
    overlap = index.measure(fresh + "\n\n" + copied)
    assert overlap.duplicated_paragraphs == 1
    assert 0 < overlap.paragraph_share < 1 and 0 < overlap.ngram_share < 1
    assert overlap.contaminated(CFG)  # any duplicated paragraph of >= 80 characters, by default
    lenient = CFG.model_copy(update={"max_paragraph_overlap": 0.99, "max_ngram_overlap": 0.99})
    assert not overlap.contaminated(lenient)


def test_whitespace_and_case_do_not_hide_a_copy(docs):
    index = Index(CFG)
    index.add(docs[:50])
    text = docs[7]
    respaced = "\n\n".join("  ".join(p.split()).upper() for p in paragraphs(text))
    overlap = index.measure(respaced)
    assert overlap.ngram_share == 1.0  # words are lower-cased
    assert overlap.duplicated_paragraphs == 0  # paragraph hashes are exact (whitespace collapsed only)


def test_verification_measures_and_can_fail(docs):
    parts = {"train": docs[:100], "validation": docs[100:120], "test": docs[120:140], "attack": docs[140:170]}
    good = verify_parts(parts, CFG)
    assert good["splits_disjoint"]["ok"] and good["splits_disjoint"]["shared_documents"]["validation/test"] == 0
    assert good["held_out_vs_train"]["parts"]["test"]["docs"] == 20
    planted = max(paragraphs(docs[5]), key=len)
    leaked = docs[150] + "\n\n" + planted
    bad = dict(parts, test=[*parts["test"], parts["validation"][0]], attack=[*parts["attack"], leaked])
    checks = verify_parts(bad, CFG)
    assert not checks["splits_disjoint"]["ok"] and checks["splits_disjoint"]["shared_documents"]["validation/test"] == 1
    assert not checks["held_out_vs_train"]["ok"]
    assert checks["held_out_vs_train"]["parts"]["attack"]["with_duplicated_paragraph"] >= 1
    assert "attack 1" in checks["held_out_vs_train"]["detail"]


def test_stage0_refuses_splits_that_fail_the_checks(tmp_path, docs):
    from helpers import micro_config

    from monolm.data.stage import check_splits
    from monolm.study.frame import StageFailed

    cfg = micro_config(tmp_path)
    splits = data.Splits(train=docs[:100], validation=docs[100:110], test=docs[110:120], attack=docs[120:160])
    assert check_splits(cfg, splits)["splits_disjoint"]["ok"]
    splits.test.append(splits.validation[0])
    with pytest.raises(StageFailed, match="splits_disjoint: documents shared by two parts.*validation/test 1"):
        check_splits(cfg, splits)
