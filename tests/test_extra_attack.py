"""Adding an attack is its module, its config fields, its registry entry and its report section:
a random-trigger attack registered here, in one place, runs through the sequential runner and
appears in `--dry-run`, `monolm plan` and the report; the registration is undone afterwards."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
from helpers import micro_config
from pydantic import BaseModel, ConfigDict, Field

from monolm.study import registry

NAME = "random_trigger"


# --------------------------------------------------------------------------- the attack's module
class RandomTriggerConfig(BaseModel):
    """`attacks.random_trigger`: its config fields, validated by the attack's own model."""

    model_config = ConfigDict(extra="forbid")
    trigger_len: int = Field(3, gt=0)
    n_eval_texts: int = Field(8, gt=0)
    text_max_tokens: int = Field(20, gt=0)
    score_batch_size: int = Field(64, gt=0)


def run_random_trigger(cfg, cell, inputs, *, progress=True, on_log=None, stage=NAME):
    """A random trigger of `trigger_len` tokens prepended to the held-out texts, scored with the
    attacks' scoring helpers; the baseline's share attacks the baseline, the cell's stage the
    constrained arm and takes the baseline's results from the share."""
    from monolm.attacks import stage as attack_stage
    from monolm.attacks.effects import effect_summary
    from monolm.attacks.scoring import context_prefix, truncate
    from monolm.attacks.uat import evaluate_trigger
    from monolm.core.artifacts import atomic_write_json
    from monolm.core.runtime import pick_device
    from monolm.study.frame import existing, finish, read_output

    if done := existing(cfg, cell, stage, inputs):
        return done
    started, section, share = time.time(), cfg.attacks.random_trigger, inputs.get(f"{NAME}_baseline")
    out, tokenizer, (_, held_out) = attack_stage._open_stage(cfg, cell, stage, inputs)
    texts = truncate(held_out[: section.n_eval_texts], section.text_max_tokens)
    trigger = random.Random(cell.seed).sample(range(len(tokenizer)), section.trigger_len)
    models = attack_stage._models(inputs, ("monotonic",) if share else ("baseline",), pick_device())
    losses = {
        arm: evaluate_trigger(model, trigger, texts, prefix=context_prefix(tokenizer), bf16=cfg.attacks.bf16)
        for arm, model in models.items()
    }
    if share is not None:
        losses = {"baseline": read_output(share, "per_example.json")["baseline"], **losses}
    atomic_write_json(out / "per_example.json", losses)
    summary = {
        arm: effect_summary(pair["clean"], pair["attacked"], threshold=cfg.attacks.success_threshold, seed=cell.seed)
        for arm, pair in losses.items()
    }
    metrics = {"per_model": {arm: attack_stage.normalize(s) for arm, s in summary.items()}, "trigger_ids": trigger}
    return finish(cfg, cell, stage, inputs=inputs, outputs=["per_example.json"], metrics=metrics, started=started)


def run_random_trigger_baseline(cfg, cell, inputs, *, progress=True, on_log=None):
    return run_random_trigger(cfg, cell, inputs, progress=progress, on_log=on_log, stage=f"{NAME}_baseline")


# --------------------------------------------------------------------------- its registry entry
SPEC = registry.AttackSpec(
    NAME,
    eval_texts="n_eval_texts",
    text_tokens="text_max_tokens",
    prefix_tokens="trigger_len",
    search_sequences=lambda s: 0,  # no search: the trigger is drawn, not optimised
    settings=RandomTriggerConfig,
)
CONFIG = (f"attacks.{NAME}", "attacks.success_threshold", "attacks.bf16")
BASELINE_STAGE = registry.Stage(
    name=f"{NAME}_baseline",
    number=6,
    kind="attack",
    scope="model",
    label="random trigger (baseline)",
    entry=f"{__name__}:run_random_trigger_baseline",
    inputs=("setup", "train_baseline"),
    config=CONFIG,
    gpu=True,
    share_of=NAME,
)
CELL_STAGE = registry.Stage(
    name=NAME,
    number=6,
    kind="attack",
    scope="cell",
    label="Random trigger",
    entry=f"{__name__}:run_random_trigger",
    inputs=("setup", "train_baseline", "train_monotonic", f"{NAME}_baseline"),
    config=CONFIG,
    gpu=True,
    reads="per_example.json",
    attack=SPEC,
)


@pytest.fixture(scope="module")
def extra_attack():
    before = (registry.seed_stages(), dict(registry.ATTACKS), dict(registry.ATTACK_SPECS))
    with registry.registered_attack(BASELINE_STAGE, CELL_STAGE):
        yield
    assert (registry.seed_stages(), dict(registry.ATTACKS), dict(registry.ATTACK_SPECS)) == before


@pytest.fixture(scope="module")
def study(extra_attack, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("extra")
    return micro_config(tmp, "attacks.random_trigger.trigger_len=2", "controls.ladder.enabled=false")


def test_registered_attack_has_config_section_and_views(study):
    from monolm.config import ConfigError
    from monolm.core.code_digest import import_closure

    assert study.attacks.random_trigger.trigger_len == 2  # its own fields, from --set
    assert registry.ATTACKS[NAME] == "Random trigger" and registry.attack_spec(NAME) is SPEC
    assert [s.name for s in registry.seed_stages()].index(NAME) < registry.seed_stage_names().index("damage")
    assert NAME in registry.stage("aggregate").inputs and NAME in registry.gpu_stages()
    assert f"{NAME}_baseline" in registry.model_stages()
    closure = import_closure(CELL_STAGE.module)  # its code version: this file and what it imports
    assert Path(__file__).resolve() in {p.resolve() for p in closure}
    assert any(p.name == "uat.py" for p in closure) and any(p.name == "effects.py" for p in closure)
    with pytest.raises(ConfigError, match="attacks.random_trigger.*trigger_len"):
        micro_config(Path("/nonexistent"), "attacks.random_trigger.trigger_len=0")


def test_dry_run_and_plan_list_the_attack(study):
    from monolm.memory.plans import plan_table
    from monolm.study.dry_run import plan_study

    planned = [e.stage for e in plan_study(study)]
    assert NAME in planned and f"{NAME}_baseline" in planned
    assert planned.index(f"{NAME}_baseline") < planned.index(NAME)
    _, rows = plan_table(study)
    row = next(r for r in rows if r["stage"] == NAME)
    seq = 1 + 2 + study.attacks.random_trigger.text_max_tokens  # context, trigger, text
    assert row["tokens"] == 4 * 2 * study.attacks.random_trigger.n_eval_texts * seq


def test_attack_runs_and_is_reported(study):
    from monolm.report.study import aggregate
    from monolm.study.cells import cells
    from monolm.study.sequential import run_seed

    refs = run_seed(study, 42, progress=False)
    per_model = refs[NAME].metrics["per_model"]
    assert set(per_model) == {"baseline", "monotonic"} and per_model["baseline"]["n"] == 8
    shared = json.loads(Path(refs[f"{NAME}_baseline"].dir, "per_example.json").read_text())
    assert json.loads(Path(refs[NAME].dir, "per_example.json").read_text())["baseline"] == shared["baseline"]
    out = aggregate(study, {cells(study)[0].label: [refs]})
    results = json.loads(Path(out["dir"], "results.json").read_text())
    assert {(s["model"], s["metric"]) for s in results["summaries"] if s["stage"] == NAME} >= {
        ("baseline", "abs_increase"),
        ("monotonic", "abs_increase"),
    }
    md = Path(out["report"]).read_text()
    section = md.index("**Random trigger: effect on the original text tokens")  # its table...
    assert md.rindex("\n## ", 0, section) == md.index("\n## Robustness")  # ...under Robustness
    assert "Random trigger Δ" in md and "Random trigger absolute loss increase" in md  # per seed, first screen
