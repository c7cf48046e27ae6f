"""The stage facts, in one place: names, order, inputs, what config and code decide each stage's
output, whether it depends on the constraint, whether it needs a GPU worker, and the file stage 7
reads from it.

Every list of stages in the project is derived from `STAGES` (config validation, folder layout,
manifests and cache keys, the plain pipeline, the Prefect flow and its per-seed tasks (made by one
factory in `tasks/seed_stages.py`), the task runners' GPU annotations, the memory plans of
`monolm plan`, stage 7 and the report's attack names). The stages are declared in the stage table
(`monolm.study.stage_table`, re-exported here); adding a stage is one entry there plus its entry
function (`entry`) and, for an attack, its report section (docs/development.md, "Adding an
attack"); an attack can also be added from its own module, `register_attack` (the derived views are recomputed
in one place, `_derive`, so read the tuples through the functions below, not copies made at import).

`scope`: a `model` stage does not depend on the constraint (stage 0, the baseline's training, and
the baseline's share of evaluation and of each attack): it is computed once per (model, seed) and
shared by every cell of the grid; a `cell` stage is computed per (model, variant, init, seed).

Plain data with no heavy import: `monolm.config` imports it, and answering a bad config must not
import torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

from monolm.study.stage_table import (  # noqa: F401  (re-exported: the table's types and attacks)
    AGGREGATE,
    GCG,
    HOTFLIP,
    SEED_STAGES,
    UAT,
    AttackSpec,
    Kind,
    Scope,
    Stage,
    shared_stages,
)

# The derived views, (re)computed by `_derive` alone: at import and when an attack is registered
# (`register_attack`). The dicts are updated in place, so a module that imported one sees the
# change; tuples and sets are replaced, so read them through the functions below.
BY_NAME: dict[str, Stage] = {}
ATTACKS: dict[str, str] = {}
TRAIN_STAGES: dict[str, str] = {}
ATTACK_SPECS: dict[str, AttackSpec] = {}
SEED_STAGE_NAMES: tuple[str, ...] = ()
STAGES: tuple[Stage, ...] = ()
STAGE_NAMES: tuple[str, ...] = ()
GPU_STAGES: frozenset[str] = frozenset()
MODEL_STAGES: frozenset[str] = frozenset()


def _derive(seed_stages: tuple[Stage, ...]) -> None:
    """Check `seed_stages` and make every derived view from them (nothing changes if they are refused)."""
    global SEED_STAGES, SEED_STAGE_NAMES, AGGREGATE, STAGES, STAGE_NAMES, GPU_STAGES, MODEL_STAGES
    aggregate = dataclasses.replace(AGGREGATE, inputs=tuple(s.name for s in seed_stages))
    stages = (*seed_stages, aggregate)
    numbers = [s.number for s in stages]
    if numbers != sorted(numbers) or set(numbers) != set(range(numbers[-1] + 1)):
        raise ValueError("stages must be listed in pipeline order, numbered 0, 1, 2, ... without gaps")
    if len({s.name for s in stages}) != len(stages):
        raise ValueError("stage names must be unique")
    attacks = {s.name: s.label for s in stages if s.kind == "attack" and s.share_of is None}
    specs = {s.name: s.attack for s in stages if s.attack is not None}
    if set(specs) != set(attacks) or any(a.name != n for n, a in specs.items()):
        raise ValueError(
            f"each attack stage ({', '.join(attacks)}) declares its own AttackSpec (`attack=`), named as it"
        )
    SEED_STAGES, AGGREGATE, STAGES = seed_stages, aggregate, stages
    SEED_STAGE_NAMES = aggregate.inputs
    STAGE_NAMES = tuple(s.name for s in stages)
    GPU_STAGES = frozenset(s.name for s in stages if s.gpu)
    MODEL_STAGES = frozenset(s.name for s in seed_stages if s.scope == "model")
    for view, value in (
        (BY_NAME, {s.name: s for s in stages}),
        (ATTACKS, attacks),
        (TRAIN_STAGES, {s.name.removeprefix("train_"): s.name for s in stages if s.kind == "train"}),
        (ATTACK_SPECS, specs),
    ):
        view.clear()
        view.update(value)


_derive(SEED_STAGES)


def seed_stages() -> tuple[Stage, ...]:
    """The per-seed stages (0-6) in pipeline order, registered attacks included."""
    return SEED_STAGES


def seed_stage_names() -> tuple[str, ...]:
    return SEED_STAGE_NAMES


def stage_names() -> tuple[str, ...]:
    """Every stage's name, stage 7 included."""
    return STAGE_NAMES


def gpu_stages() -> frozenset[str]:
    return GPU_STAGES


def model_stages() -> frozenset[str]:
    """The stages computed once per (model, seed), shared by a model's cells."""
    return MODEL_STAGES


def last_seed_stage() -> int:
    """The number of the last per-seed stage (`--stages N` runs 0..N)."""
    return SEED_STAGES[-1].number


def register_attack(baseline: Stage, cell: Stage) -> None:
    """Add an attack: its baseline's share (`baseline`, scope `model`) and its cell stage (`cell`,
    with its `AttackSpec`), after the last attack stage, every derived view updated. Its config
    section `attacks.<name>` is validated by `cell.attack.settings` (a pydantic model)."""
    spec = cell.attack
    if spec is None or spec.settings is None:
        raise ValueError(f"attack {cell.name!r}: its stage declares `attack=AttackSpec(..., settings=<model>)`")
    if baseline.share_of != cell.name or baseline.scope != "model" or cell.scope != "cell":
        raise ValueError(f"attack {cell.name!r}: the baseline stage is the model-scope share_of={cell.name!r}")
    at = max(i for i, s in enumerate(SEED_STAGES) if s.kind == "attack") + 1
    _derive((*SEED_STAGES[:at], baseline, cell, *SEED_STAGES[at:]))


def unregister_attack(name: str) -> None:
    """Remove an attack added by `register_attack` (a built-in attack has fixed config fields)."""
    spec = attack_spec(name)
    if spec.settings is None:
        raise ValueError(f"attack {name!r} is built in; only a registered attack can be removed")
    _derive(tuple(s for s in SEED_STAGES if name not in (s.name, s.share_of)))


@contextlib.contextmanager
def registered_attack(baseline: Stage, cell: Stage) -> Iterator[None]:
    """`register_attack` for the `with` block only (tests, notebooks)."""
    register_attack(baseline, cell)
    try:
        yield
    finally:
        unregister_attack(cell.name)


def stage(name: str) -> Stage:
    """The stage called `name`; a ValueError naming the known stages otherwise."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; known: {', '.join(STAGE_NAMES)}") from None


def attack_spec(name: str) -> AttackSpec:
    """The attack called `name`; a ValueError naming the known attacks otherwise (planning never
    guesses an unknown attack's lengths)."""
    try:
        return ATTACK_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; known: {', '.join(ATTACK_SPECS)}") from None


def attack_text_budget(cfg: Any) -> tuple[int, int, str]:
    """(optimisation texts, held-out texts, how the config names their sum) that every attack
    together needs from the attack split: the optimisation texts come first and are shared, and
    the held-out ones after them are shared too (each attack reports on its first ones)."""
    opt = [a for a in ATTACK_SPECS.values() if a.opt_texts is not None]
    n_opt = max((a.n_opt_texts(cfg) for a in opt), default=0)
    n_held_out = max(a.n_eval_texts(cfg) for a in ATTACK_SPECS.values())
    parts = [
        _max_of([a.field(a.opt_texts) for a in opt]),
        _max_of([a.field(a.eval_texts) for a in ATTACK_SPECS.values()]),
    ]
    return n_opt, n_held_out, " + ".join(p for p in parts if p)


def _max_of(fields: list[str]) -> str:
    return fields[0] if len(fields) == 1 else f"max({', '.join(fields)})" if fields else ""
