"""The options every `monolm` command that reads a configuration shares (preset, seeds, grid,
overrides, `--set`), and the validated config they resolve to."""

from __future__ import annotations

import argparse
from pathlib import Path

from monolm.config import ConfigError, ExperimentConfig, load_config


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help="tiny (offline, CPU), quick (nightly) or full (paper)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds to run (default: the preset's)")
    p.add_argument("--variant", help="constraint variant: mlp_in, mlp_both, mlp_in_attn_out, gated_updown, gated_all")
    p.add_argument(
        "--variants",
        nargs="+",
        metavar="VARIANT",
        help="a grid of constraint variants (or 'all': every variant the model's architecture has)",
    )
    p.add_argument("--models", nargs="+", metavar="MODEL", help="a grid of models, named in the config's models:")
    p.add_argument("--inits", nargs="+", metavar="INIT", help="a grid of conversions of W into V: abs, clamp")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="NAME",
        help="named override, e.g. 'reference' (the original study's recipe); repeatable",
    )
    p.add_argument("--config", type=Path, metavar="FILE", help="YAML file of overrides")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="sets",
        help="override one field, e.g. --set training.common.lr=1e-4; repeatable",
    )


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """The validated config of the command line's options (the grid's 'all' variants expanded)."""
    from monolm.study.cells import grid_from_lists

    extra: dict = {}
    grid = grid_from_lists(getattr(args, "models", None), getattr(args, "variants", None), getattr(args, "inits", None))
    if getattr(args, "variant", None) and "variants" in grid:
        raise ConfigError("--variant and --variants: give the grid's variants with --variants alone")
    if grid.get("variants") == ["all"]:
        from monolm.study.preflight import applicable_variants

        without = {k: v for k, v in grid.items() if k != "variants"}
        base = load_config(
            args.preset,
            overrides=args.override,
            config_file=args.config,
            sets=args.sets,
            extra={"grid": without} if without else None,
        )
        grid["variants"] = applicable_variants(base)
    if grid:
        extra["grid"] = grid
    if args.seeds:
        extra["seeds"] = args.seeds
    if getattr(args, "variant", None):
        extra["constraint"] = {"variant": args.variant}
    if getattr(args, "profile", None):
        extra["runner"] = {"profile": args.profile}
    if getattr(args, "run_name", None):
        extra["run_name"] = args.run_name
    return load_config(args.preset, overrides=args.override, config_file=args.config, extra=extra, sets=args.sets)
