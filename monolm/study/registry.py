"""The stage facts, in one place: names, order, inputs, what config and code decide each stage's
output, whether it depends on the constraint, whether it needs a GPU worker, and the file stage 7
reads from it.

Every list of stages in the project is derived from `STAGES` (config validation, folder layout,
manifests and cache keys, the plain pipeline, the Prefect flow and its per-seed tasks (made by one
factory in `tasks/seed_stages.py`), the task runners' GPU annotations, the memory plans of
`monolm plan`, stage 7 and the report's attack names). Adding a stage is one entry here plus its
entry function (`entry`) and, for an attack, its report section (docs/development.md, "Adding an attack"); an
attack can also be added from its own module, `register_attack` (the derived views are recomputed
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
import importlib
from collections.abc import Callable, Iterator
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
    Stage(
        name="train_baseline",
        number=2,
        kind="train",
        scope="model",
        label="train baseline",
        entry="monolm.training.stage:run_baseline",
        inputs=("setup",),
        config=("training", "data.seq_len"),
        gpu=True,
        reads="history.json",
    ),
    Stage(
        name="train_monotonic",
        number=3,
        kind="train",
        scope="cell",
        label="train monotonic",
        entry="monolm.training.stage:run_monotonic",
        inputs=("setup", "constrain"),
        config=("training", "data.seq_len", "constraint"),
        gpu=True,
        reads="history.json",
    ),
    Stage(
        name="evaluate_baseline",
        number=4,
        kind="evaluate",
        scope="model",
        label="evaluate (base and baseline)",
        entry="monolm.evaluation.stage:run_baseline",
        inputs=_BASELINE,
        config=("evaluation", "data.seq_len"),
        gpu=True,
        share_of="evaluate",
    ),
    Stage(
        name="evaluate",
        number=4,
        kind="evaluate",
        scope="cell",
        label="evaluate",
        entry="monolm.evaluation.stage:run",
        inputs=("setup", "train_monotonic", "evaluate_baseline"),
        config=("evaluation", "data.seq_len"),
        gpu=True,
        reads="evaluation.json",
    ),
    Stage(
        name="uat_baseline",
        number=5,
        kind="attack",
        scope="model",
        label="UAT (baseline)",
        entry="monolm.attacks.stage:run_uat_baseline",
        inputs=_BASELINE,
        config=_UAT_CONFIG,
        gpu=True,
        share_of="uat",
    ),
    Stage(
        name="uat",
        number=5,
        kind="attack",
        scope="cell",
        label="UAT",
        entry="monolm.attacks.stage:run_uat",
        inputs=(*_BOTH_ARMS, "uat_baseline"),
        config=_UAT_CONFIG,
        gpu=True,
        reads="per_example.json",
        attack=UAT,
    ),
    Stage(
        name="hotflip_baseline",
        number=6,
        kind="attack",
        scope="model",
        label="HotFlip (baseline)",
        entry="monolm.attacks.stage:run_hotflip_baseline",
        inputs=_BASELINE,
        config=_HOTFLIP_CONFIG,
        gpu=True,
        share_of="hotflip",
    ),
    Stage(
        name="hotflip",
        number=6,
        kind="attack",
        scope="cell",
        label="HotFlip",
        entry="monolm.attacks.stage:run_hotflip",
        inputs=(*_BOTH_ARMS, "hotflip_baseline"),
        config=_HOTFLIP_CONFIG,
        gpu=True,
        reads="per_example.json",
        attack=HOTFLIP,
    ),
    # Universal GCG and its random control (stage 6's slot: the attacks after UAT's).
    Stage(
        name="gcg_baseline",
        number=6,
        kind="attack",
        scope="model",
        label="GCG (baseline)",
        entry="monolm.attacks.gcg_stage:run_gcg_baseline",
        inputs=_BASELINE,
        config=_GCG_CONFIG,
        gpu=True,
        share_of="gcg",
    ),
    Stage(
        name="gcg",
        number=6,
        kind="attack",
        scope="cell",
        label="GCG",
        entry="monolm.attacks.gcg_stage:run_gcg",
        inputs=(*_BOTH_ARMS, "gcg_baseline"),
        config=_GCG_CONFIG,
        gpu=True,
        reads="per_example.json",
        attack=GCG,
    ),
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
