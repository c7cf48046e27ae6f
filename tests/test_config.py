"""A bad config is refused before any compute, with the field, the value and what is allowed."""

import pytest

from monolm.config import ConfigError, available_presets, load_config, parse_set


def refused(*sets, preset="tiny", **kw) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(preset, sets=list(sets), **kw)
    return str(info.value)


def test_presets_load_and_differ():
    assert set(available_presets()) >= {"tiny", "quick", "full"}
    tiny, full = load_config("tiny"), load_config("full")
    assert tiny.model.source == "tiny" and tiny.data.source == "embedded"
    assert full.model.name == "EleutherAI/pythia-1.4b" and full.data.dataset == "monology/pile-uncopyrighted"
    assert full.seeds == [42, 1337, 2024, 8888, 12345]


@pytest.mark.parametrize(
    "assignment, field, fragment",
    [
        ("bogus.key=1", "bogus", "unknown setting"),
        ("training.common.lr=0", "training.common.lr", "greater than 0"),
        ("training.common.lr=-1e-4", "training.common.lr", "greater than 0"),
        ("constraint.variant=mlp_out", "constraint.variant", "'mlp_in', 'mlp_both'"),
        ("data.seq_len=100000", "data.seq_len=100000", "maximum sequence length 256"),
        ("seeds=[1, 2.5]", "seeds.1", "valid integer"),
        ('seeds=["a"]', "seeds.0", "valid integer"),
        ("data.test_split=train", "data.test_split='train'", "data.train_split='train'"),
        ("data.val_split=train", "data.val_split='train'", "held-out"),
        ("data.eval_split=validation", "data.eval_split", "replaced by data.val_split"),
        ("seeds=[42, -1]", "seeds.1", "greater than or equal to 0"),
        ("training.common.micro_batch_size=0", "training.common.micro_batch_size", "greater than 0"),
        ("attacks.uat.trigger_len=60", "attacks.uat.trigger_len=60", "not shorter than the texts"),
    ],
)
def test_bad_values_name_the_field(assignment, field, fragment):
    message = refused(assignment)
    assert field in message and fragment in message


def test_fair_recipe_refuses_per_arm_settings_unless_declared():
    message = refused("training.monotonic.lr=1e-3")
    assert "training.monotonic.lr" in message and "fair" in message
    cfg = load_config("tiny", sets=["training.recipe=asymmetric", "training.monotonic.lr=1e-3"])
    assert cfg.training.arm("monotonic").lr == 1e-3 and cfg.training.arm("baseline").lr == cfg.training.common.lr


def test_default_recipe_is_fair_and_reference_is_the_original_study():
    fair = load_config("full")
    assert fair.training.recipe == "fair" and fair.training.arm("baseline") == fair.training.arm("monotonic")
    ref = load_config("full", overrides=["reference"])
    base, mono = ref.training.arm("baseline"), ref.training.arm("monotonic")
    assert ref.training.recipe == "reference"
    assert (base.epochs, base.lr, base.warmup_ratio) == (5, 1e-5, 0.1)
    assert (mono.epochs, mono.lr, mono.warmup_ratio) == (10, 5e-5, 0.2)
    assert base.effective_batch_size == 32 and ref.data.seq_len == 2048
    assert (base.weight_decay, base.grad_clip, base.bf16, base.gradient_checkpointing) == (0.01, 1.0, "on", "on")


def test_unknown_preset_and_override_and_syntax():
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*tiny"):
        load_config("huge")
    with pytest.raises(ConfigError, match="unknown named override 'nope'"):
        load_config("tiny", overrides=["nope"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_set("training.common.lr")


def test_overrides_from_yaml_file_and_set(tmp_path):
    f = tmp_path / "site.yaml"
    f.write_text("training:\n  common:\n    lr: 2.0e-4\nseeds: [7, 8]\n")
    cfg = load_config("tiny", config_file=f, sets=["seeds=[9]"])
    assert cfg.training.common.lr == 2e-4 and cfg.seeds == [9]
    f.write_text("seeds: [1]\ntraining: [unclosed\n")
    with pytest.raises(ConfigError, match=f"config file: {f}, line 3, column 1: not valid YAML") as err:
        load_config("tiny", config_file=f)
    assert "unicode string" not in str(err.value)
    with pytest.raises(ConfigError, match=f"config file: {tmp_path} is a folder"):
        load_config("tiny", config_file=tmp_path)


@pytest.mark.parametrize(
    "assignment, suggestion",
    [
        ("training.common.learning_rate=1e-4", "did you mean 'lr'?"),
        ("training.common.warmup_ration=0.1", "did you mean 'warmup_ratio'?"),
        ("trainng.common.lr=1e-4", "did you mean 'training'?"),
        ("constraint.variant=mlp_bth", "did you mean 'mlp_both'?"),
        ("grid.variants=[mlp_bth]", "did you mean 'mlp_both'?"),
    ],
)
def test_typos_get_a_did_you_mean(assignment, suggestion):
    """Issue 24: an unknown setting or value names the closest known one."""
    assert suggestion in refused(assignment)


def test_unknown_preset_gets_a_suggestion_and_secrets_are_never_echoed():
    with pytest.raises(ConfigError, match="unknown preset 'quik'; did you mean 'quick'"):
        load_config("quik")
    for assignment in ("data.api_token=hunter2", "paths.store_url=[hunter2]"):
        message = refused(assignment)
        assert "hunter2" not in message and assignment.split("=")[0] in message


def test_default_run_name_says_each_part_once():
    tiny = load_config("tiny")
    assert tiny.study_name == "tiny-neox-mlp_in-fair-seeds-42"
    assert tiny.default_run_name == f"tiny-neox-mlp_in-fair-seeds-42-{tiny.study_digest()[:8]}"
    full = load_config("full", sets=["seeds=[1, 2]", "constraint.variant=mlp_both"])
    assert full.study_name == "full-EleutherAI--pythia-1.4b-mlp_both-fair-seeds-1-2"


@pytest.mark.security
def test_default_run_name_tells_configurations_apart():
    """Two configurations never share a default results folder; where and how a run runs (paths,
    runner, its own name) does not make it another configuration."""
    base = load_config("tiny")
    other_lr = load_config("tiny", sets=["training.common.lr=0.001"])
    assert base.default_run_name != other_lr.default_run_name
    moved = load_config("tiny", sets=["paths.results_root=elsewhere", "runner.retries=0", "run_name=x"])
    assert moved.default_run_name == base.default_run_name


@pytest.mark.security
@pytest.mark.parametrize("name", ["a*", "../up", "a/b", ".hidden", "-lead", "x" * 151, "a b", "Docs?"])
def test_run_name_must_be_a_folder_name(name):
    secret = "PLANTED" + "-value"
    with pytest.raises(ConfigError, match="run_name: not a folder name") as caught:
        load_config("tiny", extra={"run_name": name + secret})
    assert secret not in str(caught.value)  # the value is never echoed


def test_cache_digest_follows_only_its_sections():
    a = load_config("tiny")
    b = load_config("tiny", sets=["attacks.uat.top_k=7"])
    assert a.digest("training") == b.digest("training")
    assert a.digest("attacks.uat") != b.digest("attacks.uat")


@pytest.mark.parametrize(
    "model_sets",
    [[], ["model.source=architecture", "model.architecture=pythia-70m"]],
    ids=["tiny", "architecture"],
)
def test_a_model_built_offline_refuses_hub_data_naming_its_source(model_sets):
    """The tiny model (and a shipped architecture) trains its tokenizer on the corpus in stage 0:
    hub data is refused, the message naming the model's own source (the refusal had moved under
    `architecture` only and still said 'tiny')."""
    message = refused(*model_sets, "data.source=hub", "data.dataset=monology/pile-uncopyrighted")
    source = "architecture" if model_sets else "tiny"
    assert f"data.source='hub' with model.source='{source}'" in message
    assert "'embedded' or 'local'" in message
