"""The Pythia suite's shapes ship as data and build, without a download, into models of exactly
the published size; a config that uses one says everywhere that its weights are random."""

from __future__ import annotations

import json

import pytest
import torch

from monolm.config import ConfigError, load_config
from monolm.models import catalogue as architectures

# Total parameters of the published models (Pythia README, github.com/EleutherAI/pythia, "Total
# Params"; equal to the counts of the EleutherAI/pythia-<size> checkpoints, whose config.json files
# give the shapes in monolm/models/catalogue.yaml). Each is 2*V*h + L*(12h^2 + 13h) + 2h with V = 50,304:
# untied input and output embeddings, per layer QKV (3h^2+3h), attention output (h^2+h), FFN
# (8h^2+5h) and two LayerNorms (4h), and the final LayerNorm.
PUBLISHED = {
    "pythia-70m": 70_426_624,
    "pythia-160m": 162_322_944,
    "pythia-410m": 405_334_016,
    "pythia-1b": 1_011_781_632,
    "pythia-1.4b": 1_414_647_808,
    "pythia-2.8b": 2_775_208_960,
}


def test_the_suite_is_shipped():
    assert architectures.names() == list(PUBLISHED)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_meta_model_has_the_published_parameter_count(name):
    arch = architectures.get(name)
    model = architectures.build_model(arch, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name] == arch.parameters
    h, L, V = arch.hidden, arch.layers, arch.vocab
    assert 2 * V * h + L * (12 * h * h + 13 * h) + 2 * h == PUBLISHED[name]
    config = model.config
    assert (config.vocab_size, config.max_position_embeddings) == (50304, 2048)
    rotary_dims = 2 * model.gpt_neox.rotary_emb.inv_freq.numel()  # rotary_pct 0.25 of each head
    assert rotary_dims == int(0.25 * h // arch.heads)
    assert config.use_parallel_residual and not config.tie_word_embeddings
    assert config.intermediate_size == 4 * config.hidden_size
    assert config.hidden_size % config.num_attention_heads == 0


def test_shapes_of_the_published_configs():
    shapes = {n: (a.layers, a.hidden, a.heads) for n, a in ((n, architectures.get(n)) for n in PUBLISHED)}
    assert shapes == {
        "pythia-70m": (6, 512, 8),
        "pythia-160m": (12, 768, 12),
        "pythia-410m": (24, 1024, 16),
        "pythia-1b": (16, 2048, 8),
        "pythia-1.4b": (24, 2048, 16),
        "pythia-2.8b": (32, 2560, 32),
    }


def test_hub_ids_map_to_shipped_shapes():
    assert architectures.for_hub_id("EleutherAI/pythia-1.4b").name == "pythia-1.4b"
    assert architectures.for_hub_id("EleutherAI/pythia-410m-deduped").name == "pythia-410m"
    assert architectures.for_hub_id("meta-llama/Llama-3.2-1B") is None
    with pytest.raises(ValueError, match="pythia-1.4b"):
        architectures.get("pythia-7b")


def test_build_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    a = architectures.build_model("pythia-70m", seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = architectures.build_model("pythia-70m", seed=3)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name
        assert p.dtype == torch.float32


def test_config_names_random_weights_everywhere(tmp_path):
    cfg = load_config("tiny", sets=["model.source=architecture", "model.architecture=pythia-160m"])
    assert cfg.model.random_weights
    assert "RANDOM WEIGHTS" in cfg.model.name and "pythia-160m" in cfg.model.name
    assert cfg.model.slug == "pythia-160m-random-weights"
    assert "random-weights" in cfg.default_run_name
    sets = ["model.source=architecture", "model.architecture=pythia-160m", "model.name=EleutherAI/pythia-160m"]
    again = load_config("tiny", sets=sets)
    assert "RANDOM WEIGHTS" in again.model.name  # a name given by hand cannot hide it


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["model.source=architecture"], "model.architecture is required"),
        (["model.source=architecture", "model.architecture=pythia-7b"], "not a shipped architecture"),
        (["model.architecture=pythia-70m"], "only used with model.source='architecture'"),
        (["model.source=architecture", "model.architecture=pythia-70m", "data.seq_len=4096"], "2048"),
    ],
)
def test_bad_architecture_settings_are_refused(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", sets=sets)


def test_setup_stage_builds_the_architecture_offline_and_says_so(tmp_path):
    from helpers import micro_config

    from monolm.data import stage as setup
    from monolm.models.loading import load_model, random_weights_note
    from monolm.study.layout import cell_paths

    cfg = micro_config(tmp_path, "model.source=architecture", "model.architecture=pythia-70m")
    ref = setup.run(cfg, cell_paths(cfg, 42), {}, progress=False)
    assert "pretrain" not in ref.metrics  # random weights stay random
    assert "RANDOM WEIGHTS" in ref.metrics["random_weights"]
    assert ref.metrics["embedding_rows"] == 50304 and ref.metrics["tokenizer_size"] <= 500
    verification = json.loads((ref.path / "verification.json").read_text())
    assert "RANDOM WEIGHTS" in verification["random_weights"]
    assert "random-weights" in str(ref.path)
    model = load_model(ref.metrics["model_dir"])
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED["pythia-70m"]
    assert "RANDOM WEIGHTS" in random_weights_note(model)  # in config.json: every copy carries it


@pytest.mark.parametrize(
    "sets",
    [
        ["model.source=architecture", "model.architecture=pythia-70m"],
        [],  # the tiny model
    ],
)
def test_one_shape_for_every_source_known_without_a_download(sets, tmp_path):
    """`model_shape` (plan, memory plans) and `transformers_config` (preflight, verify) describe
    the same model: the counted parameters of the config equal the shape's."""
    from monolm.models.shape import count_parameters, model_shape, transformers_config

    cfg = load_config("tiny", sets=[*sets, f"paths.cache_dir={tmp_path}"])
    shape, config = model_shape(cfg), transformers_config(cfg)
    assert config is not None
    assert shape.parameters == count_parameters(config)
    assert (shape.layers, shape.hidden, shape.vocab) == (
        config.num_hidden_layers,
        config.hidden_size,
        config.vocab_size,
    )


def test_variants_all_and_the_variant_check_know_a_shipped_architecture():
    """`--variants all` on `model.source: architecture` lists the variants a GPT-NeoX has (it was
    refused as "not known before it is downloaded"), and `verify`'s variant check runs."""
    from monolm.models.shape import check_variant
    from monolm.study.preflight import applicable_variants

    cfg = load_config("tiny", sets=["model.source=architecture", "model.architecture=pythia-70m"])
    assert applicable_variants(cfg) == ["mlp_in", "mlp_both", "mlp_in_attn_out"]
    assert check_variant(cfg).startswith("mlp_in: 6 Linear modules")
    gated = load_config("tiny", sets=["model.source=architecture", "model.architecture=pythia-70m",
                                      "constraint.variant=gated_all"])  # fmt: skip
    with pytest.raises(ConfigError, match="constraint.variant"):
        check_variant(gated)
