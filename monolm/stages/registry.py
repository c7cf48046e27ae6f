"""The stage facts, in one place: names, order, inputs, what config and code decide each stage's
output, whether it needs a GPU worker, and the file stage 7 reads from it.

Every list of stages in the project is derived from `STAGES` (config validation, folder layout,
manifests and cache keys, the plain pipeline, the Prefect flow, the task runners' GPU
annotations, stage 7 and the report's attack names). Adding a stage is one entry here plus its
entry function (`entry`), its task in `tasks/seed_stages.py` and, for an attack, its report section
(README, "Adding an attack").

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

    def function(self) -> Callable[..., Any]:
        module, _, name = self.entry.partition(":")
        return getattr(importlib.import_module(module), name)


_TRAINED = ("setup", "train_baseline", "train_monotonic")  # what evaluation and the attacks start from

SEED_STAGES: tuple[Stage, ...] = (
    Stage(
        name="setup",
        number=0,
        kind="setup",
        label="setup",
        entry="monolm.stages.setup:run",
        inputs=(),
        config=("model", "data"),
        code=(*SHARED_CODE, "contamination", "training", "checkpoint", "stages.setup"),
        gpu=False,
    ),
    # A GPU stage although it does not train: it computes with the model and uses parametrizations,
    # which must not share a process with another stage (`parametrize.cached` is process-global).
    Stage(
        name="constrain",
        number=1,
        kind="constrain",
        label="constrain",
        entry="monolm.stages.constrain:run",
        inputs=("setup",),
        config=("constraint",),
        code=(*SHARED_CODE, "constraints", "drift", "monotonicity", "stages.constrain"),
        gpu=True,
        reads="report.json",
    ),
    Stage(
        name="train_baseline",
        number=2,
        kind="train",
        label="train baseline",
        entry="monolm.stages.train:run_baseline",
        inputs=("setup",),
        config=("training", "data.seq_len"),
        code=(*SHARED_CODE, "training", "checkpoint", "evaluation", "stages.train"),
        gpu=True,
        reads="history.json",
    ),
    Stage(
        name="train_monotonic",
        number=3,
        kind="train",
        label="train monotonic",
        entry="monolm.stages.train:run_monotonic",
        inputs=("setup", "constrain"),
        config=("training", "data.seq_len", "constraint"),
        code=(*SHARED_CODE, "training", "checkpoint", "evaluation", "constraints", "monotonicity", "stages.train"),
        gpu=True,
        reads="history.json",
    ),
    Stage(
        name="evaluate",
        number=4,
        kind="evaluate",
        label="evaluate",
        entry="monolm.stages.evaluate:run",
        inputs=_TRAINED,
        config=("evaluation", "data.seq_len"),
        code=(*SHARED_CODE, "evaluation", "constraints", "monotonicity", "stages.evaluate"),
        gpu=True,
        reads="evaluation.json",
    ),
    Stage(
        name="uat",
        number=5,
        kind="attack",
        label="UAT",
        entry="monolm.stages.attack:run_uat",
        inputs=_TRAINED,
        config=("attacks.uat", "attacks.success_threshold", "attacks.bf16"),
        code=(*SHARED_CODE, "attacks", "stats", "stages.attack"),
        gpu=True,
        reads="per_example.json",
    ),
    Stage(
        name="hotflip",
        number=6,
        kind="attack",
        label="HotFlip",
        entry="monolm.stages.attack:run_hotflip",
        inputs=_TRAINED,
        config=("attacks.hotflip", "attacks.success_threshold", "attacks.uat.n_opt_texts", "attacks.bf16"),
        code=(*SHARED_CODE, "attacks", "stats", "stages.attack"),
        gpu=True,
        reads="per_example.json",
    ),
)
SEED_STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in SEED_STAGES)
# Stage 7 reads every per-seed stage of every seed; its output depends on the whole config.
AGGREGATE = Stage(
    name="aggregate",
    number=7,
    kind="aggregate",
    label="aggregate",
    entry="monolm.stages.aggregate:run",
    inputs=SEED_STAGE_NAMES,
    config=None,
    code=("stats", "attacks.effects", "report", "plots", "store", "stages.aggregate"),
    gpu=False,
)
STAGES: tuple[Stage, ...] = (*SEED_STAGES, AGGREGATE)
if [s.number for s in STAGES] != list(range(len(STAGES))):
    raise ValueError("stage numbers must be their positions in STAGES")

BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
GPU_STAGES: frozenset[str] = frozenset(s.name for s in STAGES if s.gpu)
ATTACKS: dict[str, str] = {s.name: s.label for s in STAGES if s.kind == "attack"}
TRAIN_STAGES: dict[str, str] = {s.name.removeprefix("train_"): s.name for s in STAGES if s.kind == "train"}


def stage(name: str) -> Stage:
    """The stage called `name`; a ValueError naming the known stages otherwise."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; known: {', '.join(STAGE_NAMES)}") from None
