"""The stage table: each stage's facts declared once (`Stage`, an attack's `AttackSpec`) and the
built-in per-seed stages in pipeline order (`SEED_STAGES`) plus stage 7 (`AGGREGATE`).

`monolm.study.registry` derives every list of stages from this table (and from attacks added with
`register_attack`); read the stages through it, not from here. A stage computed once per (model,
seed) for the baseline and shared by the cells (evaluation, each attack) is declared as a pair by
`shared_stages`. Plain data with no heavy import (see the registry's docstring).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["setup", "constrain", "train", "evaluate", "attack", "control", "aggregate"]
Scope = Literal["model", "cell", "study"]


@dataclass(frozen=True)
class Stage:
    """One stage of the experiment.

    `number`: its place in the 8-stage pipeline (0-7; a baseline share has its stage's number).
    `config`: the config sections (dotted paths) that change the stage's output; None means the
    whole config (stage 7). The code that does is the import closure of `entry`'s module
    (`monolm.core.code_digest`). `entry`:
    "module:function" of the stage's run function, imported only when the stage runs; per-seed
    stages take `(cfg, cell, inputs, *, progress, on_log)`. `reads`: the file stage 7 reads from
    the stage's folder. `label`: how reports name it. `share_of`: the cell stage a model-scope
    stage computes the baseline's share of. `attack`: an attack stage's lengths and text budget.
    """

    name: str
    number: int
    kind: Kind
    scope: Scope
    label: str
    entry: str
    inputs: tuple[str, ...]
    config: tuple[str, ...] | None
    gpu: bool
    reads: str | None = None
    share_of: str | None = None
    attack: AttackSpec | None = None

    @property
    def module(self) -> str:
        """The dotted module of the stage's entry function."""
        return self.entry.partition(":")[0]

    def function(self) -> Callable[..., Any]:
        module, _, name = self.entry.partition(":")
        return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class AttackSpec:
    """What planning, the config checks, stage 0 and the attack stage need to know of an attack,
    declared once: fields of its config section `attacks.<name>`.

    `eval_texts`: the held-out texts it reports on; `text_tokens`: the tokens each text is cut to;
    `opt_texts`: optimisation texts it needs, disjoint from every attack's held-out texts (None:
    it optimises per text); `prefix_tokens`: tokens it prepends to every text (a trigger);
    `grad_rows`: rows per gradient pass (None: one). `settings`: the pydantic model of a registered
    (`register_attack`) attack's config section; the built-in attacks' sections are fixed fields.
    `search_sequences(section)`: sequences one arm's search puts through the model (`monolm plan`'s
    workload; a gradient pass counts as 3).
    An attacked sequence is one context token, the prefix and the text.
    """

    name: str
    eval_texts: str
    text_tokens: str
    search_sequences: Callable[[Any], int]
    opt_texts: str | None = None
    prefix_tokens: str | None = None
    grad_rows: str | None = None
    settings: Any = None  # a registered attack's config model (pydantic); built-in attacks: None

    def section(self, cfg: Any) -> Any:
        """The attack's config section, `cfg.attacks.<name>`."""
        return getattr(cfg.attacks, self.name)

    def field(self, name: str) -> str:
        return f"attacks.{self.name}.{name}"

    def _value(self, cfg: Any, name: str | None, default: int = 0) -> int:
        return default if name is None else getattr(self.section(cfg), name)

    def n_eval_texts(self, cfg: Any) -> int:
        return self._value(cfg, self.eval_texts)

    def n_opt_texts(self, cfg: Any) -> int:
        return self._value(cfg, self.opt_texts)

    def attended_tokens(self, cfg: Any) -> tuple[str, int]:
        """(how a config error names it, its value): the prefix and text the model attends over."""
        if self.prefix_tokens is None:
            return self.field(self.text_tokens), self._value(cfg, self.text_tokens)
        name = f"attacks.{self.name} ({self.prefix_tokens} + {self.text_tokens})"
        return name, self._value(cfg, self.prefix_tokens) + self._value(cfg, self.text_tokens)

    def lengths(self, cfg: Any) -> tuple[int, int, int]:
        """(tokens per attacked sequence, target positions per sequence, rows per gradient pass)."""
        targets = self._value(cfg, self.text_tokens)
        return 1 + self._value(cfg, self.prefix_tokens) + targets, targets, self._value(cfg, self.grad_rows, 1)


def _uat_search(u: Any) -> int:
    steps = u.restarts * u.max_sweeps * u.trigger_len
    return steps * u.n_opt_texts * (3 + u.top_k + 1) + 2 * u.n_eval_texts


def _hotflip_search(f: Any) -> int:
    return (2 if f.random_control else 1) * f.n_texts * f.max_flips * (3 + f.top_b + 1)


UAT = AttackSpec(
    "uat",
    eval_texts="n_eval_texts",
    text_tokens="text_max_tokens",
    search_sequences=_uat_search,
    opt_texts="n_opt_texts",
    prefix_tokens="trigger_len",
    grad_rows="grad_batch_size",
)


def _gcg_search(g: Any) -> int:
    # per step a gradient pass over the optimisation texts (3) and `search_width` candidates over
    # them; each restart's best trigger on the held-out texts; the random control the same again
    per_step = g.n_opt_texts * (3 + g.search_width)
    searches = 2 if g.random_control else 1
    return searches * (g.restarts * (g.steps * per_step + g.n_eval_texts) + g.n_eval_texts)


HOTFLIP = AttackSpec("hotflip", eval_texts="n_texts", text_tokens="text_max_tokens", search_sequences=_hotflip_search)
GCG = AttackSpec(
    "gcg",
    eval_texts="n_eval_texts",
    text_tokens="text_max_tokens",
    search_sequences=_gcg_search,
    opt_texts="n_opt_texts",
    prefix_tokens="trigger_len",
    grad_rows="grad_batch_size",
)
_UAT_CONFIG = ("attacks.uat", "attacks.success_threshold", "attacks.bf16")
_HOTFLIP_CONFIG = ("attacks.hotflip", "attacks.success_threshold", "attacks.uat.n_opt_texts", "attacks.bf16")
_GCG_CONFIG = ("attacks.gcg", "attacks.uat.n_opt_texts", "attacks.success_threshold", "attacks.bf16")
_BASELINE = ("setup", "train_baseline")  # what the baseline's shares start from
_BOTH_ARMS = ("setup", "train_baseline", "train_monotonic")


def shared_stages(
    name: str,
    *,
    number: int,
    kind: Kind,
    label: str,
    entry: str,
    config: tuple[str, ...],
    cell_inputs: tuple[str, ...],
    reads: str,
    attack: AttackSpec | None = None,
    baseline_label: str | None = None,
) -> tuple[Stage, Stage]:
    """A stage whose baseline share is computed once per (model, seed) and the cell stage that
    uses it, as a pair: `<name>_baseline` (scope `model`, from the baseline's inputs, entry
    `<entry>_baseline`, `share_of=name`, labelled `<label> (baseline)` unless `baseline_label`
    says otherwise) and `<name>` (scope `cell`, `cell_inputs` then the share). Both run on a GPU
    worker and depend on the same `config` sections."""
    baseline = Stage(
        name=f"{name}_baseline",
        number=number,
        kind=kind,
        scope="model",
        label=baseline_label or f"{label} (baseline)",
        entry=f"{entry}_baseline",
        inputs=_BASELINE,
        config=config,
        gpu=True,
        share_of=name,
    )
    cell = Stage(
        name=name,
        number=number,
        kind=kind,
        scope="cell",
        label=label,
        entry=entry,
        inputs=(*cell_inputs, baseline.name),
        config=config,
        gpu=True,
        reads=reads,
        attack=attack,
    )
    return baseline, cell


def _attack_stages(name: str, number: int, label: str, entry: str, config: tuple[str, ...], attack: AttackSpec):
    """An attack's pair: the cell stage attacks both arms and reads the per-example losses."""
    return shared_stages(
        name,
        number=number,
        kind="attack",
        label=label,
        entry=entry,
        config=config,
        cell_inputs=_BOTH_ARMS,
        reads="per_example.json",
        attack=attack,
    )


def _training(arm: str, number: int, scope: Scope, inputs: tuple[str, ...], config: tuple[str, ...]) -> Stage:
    """An arm's training stage, `train_<arm>`: the recipe and sequence length decide its output,
    plus `config` (the constrained arm's constraint); it writes its curves to history.json."""
    return Stage(
        name=f"train_{arm}",
        number=number,
        kind="train",
        scope=scope,
        label=f"train {arm}",
        entry=f"monolm.training.stage:run_{arm}",
        inputs=inputs,
        config=("training", "data.seq_len", *config),
        gpu=True,
        reads="history.json",
    )


SEED_STAGES: tuple[Stage, ...] = (
    Stage(
        name="setup",
        number=0,
        kind="setup",
        scope="model",
        label="setup",
        entry="monolm.data.stage:run",
        inputs=(),
        config=("model", "data"),
        gpu=False,
    ),
    # A GPU stage although it does not train: it computes with the model and uses parametrizations,
    # which must not share a process with another stage (`parametrize.cached` is process-global).
    Stage(
        name="constrain",
        number=1,
        kind="constrain",
        scope="cell",
        label="constrain",
        entry="monolm.constraint.stage:run",
        inputs=("setup",),
        config=("constraint",),
        gpu=True,
        reads="report.json",
    ),
    _training("baseline", 2, "model", ("setup",), ()),
    _training("monotonic", 3, "cell", ("setup", "constrain"), ("constraint",)),
    *shared_stages(
        "evaluate",
        number=4,
        kind="evaluate",
        label="evaluate",
        baseline_label="evaluate (base and baseline)",
        entry="monolm.evaluation.stage:run",
        config=("evaluation", "data.seq_len"),
        cell_inputs=("setup", "train_monotonic"),
        reads="evaluation.json",
    ),
    *_attack_stages("uat", 5, "UAT", "monolm.attacks.stage:run_uat", _UAT_CONFIG, UAT),
    *_attack_stages("hotflip", 6, "HotFlip", "monolm.attacks.stage:run_hotflip", _HOTFLIP_CONFIG, HOTFLIP),
    # Universal GCG and its random control (stage 6's slot: the attacks after UAT's).
    *_attack_stages("gcg", 6, "GCG", "monolm.attacks.gcg_stage:run_gcg", _GCG_CONFIG, GCG),
    # The damage-matched arm (issue 23): the baseline perturbed to the constrained arm's validation
    # loss, evaluated and attacked with every attack's settings (`monolm.controls`). Last, so that
    # `--stages 6` still means "everything"; its number is HotFlip's because it runs the attacks.
    Stage(
        name="damage",
        number=6,
        kind="control",
        scope="cell",
        label="damage-matched arm",
        entry="monolm.controls.stage:run",
        inputs=("setup", "train_baseline", "train_monotonic"),
        config=("controls.damage", "constraint.variant", "training", "data.seq_len", "evaluation", "attacks"),
        gpu=True,
        reads="damage.json",
    ),
    # The quality ladder (monolm.controls.ladder): reference models evaluated and attacked like the
    # arms, a model's shared work; numbered with the last attack it repeats.
    Stage(
        name="ladder",
        number=6,
        kind="control",
        scope="model",
        label="quality ladder",
        entry="monolm.controls.ladder:run",
        inputs=("setup",),
        config=("controls.ladder", "evaluation", "data.seq_len", *dict.fromkeys(_UAT_CONFIG + _HOTFLIP_CONFIG)),
        gpu=True,
        reads="ladder.json",
    ),
)
# Stage 7 reads every per-seed stage of every cell and seed; its output depends on the whole config.
AGGREGATE = Stage(
    name="aggregate",
    number=7,
    kind="aggregate",
    scope="study",
    label="aggregate",
    entry="monolm.report.study:aggregate",
    inputs=(),
    config=None,
    gpu=False,
)
