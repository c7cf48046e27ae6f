"""The stage facts, in one place: names, order, inputs, what config and code decide each stage's
output, whether it needs a GPU worker, and the file stage 7 reads from it.

Every list of stages in the project is derived from `STAGES` (config validation, folder layout,
manifests and cache keys, the plain pipeline, the Prefect flow, the task runners' GPU
annotations, stage 7 and the report's attack names). Adding a stage is one entry here plus its
entry function (`entry`), its task in `tasks/stages.py` and, for an attack, its report section.

Plain data with no heavy import: `monolm.config` imports it, and answering a bad config must not
import torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["setup", "constrain", "train", "evaluate", "attack", "aggregate"]

# Library modules whose code shapes every stage's output (the code-version part of each key). This
# module is not among them: the facts it holds enter each key as values (the config subset).
SHARED_CODE = ("config", "models", "data", "artifacts", "runtime", "stages.common")


@dataclass(frozen=True)
class Stage:
    """One stage of the experiment.

    `config`: the config sections (dotted paths) that change the stage's output; None means the
    whole config (stage 7). `code`: the `monolm` modules whose source does. `entry`:
    "module:function" of the stage's run function, imported only when the stage runs; per-seed
    stages take `(cfg, cell, inputs, *, progress, on_log)`. `reads`: the file stage 7 reads from
    the stage's folder. `label`: how reports name it.
    """

    name: str
    number: int
    kind: Kind
    label: str
    entry: str
    inputs: tuple[str, ...]
    config: tuple[str, ...] | None
    code: tuple[str, ...]
    gpu: bool
    reads: str | None = None

    @property
    def per_seed(self) -> bool:
        return self.kind != "aggregate"

    def function(self) -> Callable[..., Any]:
        module, _, name = self.entry.partition(":")
        return getattr(importlib.import_module(module), name)


_ATTACK_INPUTS = ("setup", "train_baseline", "train_monotonic")

STAGES: tuple[Stage, ...] = (
    Stage(
        "setup",
        0,
        "setup",
        "setup",
        "monolm.stages.setup:run",
        (),
        ("model", "data"),
        (*SHARED_CODE, "training", "checkpoint", "stages.setup"),
        gpu=False,
    ),
    # A GPU stage although it does not train: it computes with the model and uses parametrizations,
    # which must not share a process with another stage (`parametrize.cached` is process-global).
    Stage(
        "constrain",
        1,
        "constrain",
        "constrain",
        "monolm.stages.constrain:run",
        ("setup",),
        ("constraint",),
        (*SHARED_CODE, "constraints", "drift", "monotonicity", "stages.constrain"),
        gpu=True,
        reads="report.json",
    ),
    Stage(
        "train_baseline",
        2,
        "train",
        "train baseline",
        "monolm.stages.train:run_baseline",
        ("setup",),
        ("training", "data.seq_len"),
        (*SHARED_CODE, "training", "checkpoint", "evaluation", "stages.train"),
        gpu=True,
        reads="history.json",
    ),
    Stage(
        "train_monotonic",
        3,
        "train",
        "train monotonic",
        "monolm.stages.train:run_monotonic",
        ("setup", "constrain"),
        ("training", "data.seq_len", "constraint"),
        (*SHARED_CODE, "training", "checkpoint", "evaluation", "constraints", "monotonicity", "stages.train"),
        gpu=True,
        reads="history.json",
    ),
    Stage(
        "evaluate",
        4,
        "evaluate",
        "evaluate",
        "monolm.stages.evaluate:run",
        _ATTACK_INPUTS,
        ("evaluation", "data.seq_len"),
        (*SHARED_CODE, "evaluation", "constraints", "monotonicity", "stages.evaluate"),
        gpu=True,
        reads="evaluation.json",
    ),
    Stage(
        "uat",
        5,
        "attack",
        "UAT",
        "monolm.stages.attack:run_uat",
        _ATTACK_INPUTS,
        ("attacks.uat", "attacks.success_threshold", "attacks.bf16"),
        (*SHARED_CODE, "attacks", "stats", "stages.attack"),
        gpu=True,
        reads="per_example.json",
    ),
    Stage(
        "hotflip",
        6,
        "attack",
        "HotFlip",
        "monolm.stages.attack:run_hotflip",
        _ATTACK_INPUTS,
        ("attacks.hotflip", "attacks.success_threshold", "attacks.uat.n_opt_texts", "attacks.bf16"),
        (*SHARED_CODE, "attacks", "stats", "stages.attack"),
        gpu=True,
        reads="per_example.json",
    ),
    Stage(
        "aggregate",
        7,
        "aggregate",
        "aggregate",
        "monolm.stages.aggregate:run",
        ("setup", "constrain", "train_baseline", "train_monotonic", "evaluate", "uat", "hotflip"),
        None,
        ("stats", "report", "plots", "store", "stages.aggregate"),
        gpu=False,
    ),
)

BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
SEED_STAGES: tuple[Stage, ...] = tuple(s for s in STAGES if s.per_seed)
SEED_STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in SEED_STAGES)
GPU_STAGES: frozenset[str] = frozenset(s.name for s in STAGES if s.gpu)
ATTACKS: dict[str, str] = {s.name: s.label for s in STAGES if s.kind == "attack"}
TRAIN_STAGES: dict[str, str] = {s.name.removeprefix("train_"): s.name for s in STAGES if s.kind == "train"}


def stage(name: str) -> Stage:
    """The stage called `name`; a ValueError naming the known stages otherwise."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; known: {', '.join(STAGE_NAMES)}") from None
