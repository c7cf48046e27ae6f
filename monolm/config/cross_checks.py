"""The checks of `ExperimentConfig` that span sections: seeds, the attacks' shared texts and
triggers, the grid's names, the store a cluster run needs, and the sequence lengths a model can
attend over. Kept apart from the schema's fields so each reads on its own; every error names its
fields and what is allowed (`ConfigError` where the model's own limit is known only later)."""

from __future__ import annotations

from typing import Any

from monolm.config.base import FOLDER_NAME, ConfigError
from monolm.config.store_url import check_cluster_store
from monolm.study.registry import ATTACK_SPECS, attack_text_budget

# The checks take the `ExperimentConfig` being validated (`monolm.config.schema`, which imports
# this module: typed `Any` here so that the import graph stays acyclic).
Config = Any


def check_experiment(cfg: Config) -> None:
    """Every cross-section check, in the order a user meets them (first problem raised)."""
    if not cfg.seeds:
        raise ValueError("seeds: at least one seed is required")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise ValueError(f"seeds={cfg.seeds} contains duplicates")
    _check_attack_texts(cfg)
    check_grid(cfg)
    check_cluster_store(cfg.runner.profile, cfg.store_url, cfg.runner.slurm.allow_sqlite)
    if cfg.model.source == "tiny":
        check_seq_len(cfg, cfg.model.tiny.max_position_embeddings)
    if cfg.model.source == "architecture":
        from monolm.models import catalogue as architectures

        check_seq_len(cfg, architectures.get(cfg.model.architecture).max_positions)
    if cfg.model.source in ("tiny", "architecture") and cfg.data.source == "hub":
        # Stage 0 trains the offline model's tokenizer on the corpus (monolm.data.stage).
        raise ValueError(
            f"data.source='hub' with model.source={cfg.model.source!r}: a model built offline trains its "
            "tokenizer on the corpus, so data.source must be 'embedded' or 'local'"
        )


def _check_attack_texts(cfg: Config) -> None:
    """UAT's trigger leaves text to attack, GCG optimises on (a prefix of) UAT's texts, and the
    attack split holds every attack's texts."""
    uat = cfg.attacks.uat  # its trigger must leave text to attack
    if uat.trigger_len >= uat.text_max_tokens:
        raise ValueError(
            f"attacks.uat.trigger_len={uat.trigger_len} is not shorter than the texts it attacks "
            f"(attacks.uat.text_max_tokens={uat.text_max_tokens}); allowed: 1..{uat.text_max_tokens - 1}"
        )
    gcg = cfg.attacks.gcg
    if gcg.n_opt_texts > uat.n_opt_texts:  # GCG optimises on UAT's texts, so the two compare
        raise ValueError(
            f"attacks.gcg.n_opt_texts={gcg.n_opt_texts} exceeds attacks.uat.n_opt_texts={uat.n_opt_texts}; "
            f"allowed: 1..{uat.n_opt_texts}"
        )
    n_opt, n_held_out, fields = attack_text_budget(cfg)
    if cfg.data.n_attack_docs < n_opt + n_held_out:
        raise ValueError(
            f"data.n_attack_docs={cfg.data.n_attack_docs} is too small: the attacks need "
            f"{fields} = {n_opt + n_held_out} disjoint held-out texts"
        )


def check_grid(cfg: Config) -> None:
    """Named models are labelled by their key; grid axes hold no duplicates and only known
    model names (variants and inits are checked by their types)."""
    for key, model in cfg.models.items():
        if not FOLDER_NAME.match(key):
            raise ValueError(f"models.{key}: a model's name is also a folder name (letters, digits, '.', '_', '-')")
        if model.label not in (None, key):
            raise ValueError(f"models.{key}.label={model.label!r}: a named model's label is its key ({key!r})")
        model.label = key
    for axis in ("models", "variants", "inits"):
        values = getattr(cfg.grid, axis)
        duplicates = sorted({v for v in values if values.count(v) > 1})
        if duplicates:
            raise ValueError(f"grid.{axis}={values} lists {', '.join(map(repr, duplicates))} more than once")
    known = [cfg.model.slug, *(k for k in cfg.models if k != cfg.model.slug)]
    for name in cfg.grid.models:
        if name not in known:
            raise ValueError(f"grid.models: unknown model {name!r}; allowed: {', '.join(known)} (named in models:)")


def check_seq_len(cfg: Config, model_max: int) -> None:
    """Refuse sequence lengths the model cannot attend over (checked again once the model's
    own config is known, before any compute)."""
    checks = {
        "data.seq_len": cfg.data.seq_len,
        "evaluation.seq_len": cfg.evaluation.seq_len,
        **dict(attack.attended_tokens(cfg) for attack in ATTACK_SPECS.values()),
    }
    for field, value in checks.items():
        if value is not None and value > model_max:
            raise ConfigError(
                f"{field}={value} exceeds the model's maximum sequence length {model_max} (allowed: 1..{model_max})"
            )
