"""Models save and reload exactly, use safetensors only, and a missing hub id fails fast."""

import time

import pytest
import torch

from monolm.config import TinyModelConfig
from monolm.data import splits as data
from monolm.models import loading as models


@pytest.fixture(scope="module")
def tokenizer():
    return data.train_bpe_tokenizer(data.embedded_documents()[:30], 500)


def test_tiny_model_is_gpt_neox_with_unused_rows(tokenizer):
    m = models.build_tiny_model(TinyModelConfig(hidden_size=64, intermediate_size=256, num_layers=2), tokenizer, 0)
    assert type(m).__name__ == "GPTNeoXForCausalLM"
    assert m.config.vocab_size == 512 > len(tokenizer)  # padded rows like Pythia's 50304
    assert models.max_sequence_length(m) == 256


def test_save_reload_identical_logits(tmp_path, tokenizer):
    m = models.build_tiny_model(TinyModelConfig(hidden_size=64, intermediate_size=256, num_layers=2), tokenizer, 1)
    files = models.save_model(m, tokenizer, tmp_path / "model")
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    again = models.load_model(tmp_path / "model")
    x = torch.randint(0, len(tokenizer), (2, 17))
    with torch.no_grad():
        assert torch.equal(m.eval()(x).logits, again(x).logits)
    assert next(again.parameters()).dtype == torch.float32


def test_missing_hub_model_fails_fast_naming_the_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: offline, refused at once
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    start = time.time()
    with pytest.raises(models.ModelError, match="no-such-org/no-such-model"):
        models.fetch_hub_model("no-such-org/no-such-model", "main", tmp_path)
    assert time.time() - start < 60


def test_load_model_refuses_non_model_dir(tmp_path):
    with pytest.raises(models.ModelError, match="no config.json"):
        models.load_model(tmp_path)
