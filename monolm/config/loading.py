"""Resolving a configuration from its layers, and refusing what cannot run before any compute.

Layers, later wins: the schema's defaults (the `full` paper run) <- a preset YAML
(`monolm/config/presets/<name>.yaml`) <- named overrides (`monolm/config/presets/overrides/<name>.yaml`, e.g.
`reference`, the original study's asymmetric recipe) <- a user YAML file <- `--set a.b=value`.
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from monolm.config.schema import ConfigError, ExperimentConfig
from monolm.core.artifacts import nearest_existing

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
OVERRIDES_DIR = PRESETS_DIR / "overrides"


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def available_overrides() -> list[str]:
    return sorted(p.stem for p in OVERRIDES_DIR.glob("*.yaml"))


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{what}: file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{what}: {path} is a folder; give a YAML file inside it") from None
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path} ({exc.strerror or exc})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what}: {path} is not valid YAML ({_yaml_problem(exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: {path} must contain a mapping, got {type(data).__name__}")
    return data


def _yaml_problem(exc: Exception) -> str:
    """Where and what, never the text: PyYAML's message quotes the offending line, which may hold
    a secret."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or type(exc).__name__
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_set(assignment: str) -> dict[str, Any]:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}; the value is parsed as YAML (numbers, lists,
    booleans, null), so `--set seeds=[1,2]` and `--set training.common.lr=1e-4` work."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        # Without '=' the text may be a value (a token pasted in the wrong place): never echoed.
        raise ConfigError("invalid override: expected KEY=VALUE with a dotted key, e.g. --set training.common.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: value is not valid YAML ({_yaml_problem(exc)})") from None
    # PyYAML reads 1e-4 (no dot) as a string; accept it as the float the user meant.
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value) if any(c in value.lower() for c in "e.") and value.strip() else value
    node: dict[str, Any] = {}
    root = node
    parts = key.split(".")
    for part in parts[:-1]:
        node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return root


def _shown(value: Any) -> str:
    """A number cannot hold a secret, so it is shown; any other value only by its type."""
    if isinstance(value, bool | int | float):
        return repr(value)
    return f"a {type(value).__name__}"


def _format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        msg = err["msg"]
        # The field is named, its value never shown: a misplaced key may hold a token.
        if err["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown field; check the spelling against `monolm config show`")
        elif err["type"] in ("literal_error", "enum"):
            lines.append(f"{loc}: not an allowed value; {msg}")
        elif err["type"] == "value_error":
            lines.append(msg.removeprefix("Value error, "))
        else:
            lines.append(f"{loc}: {msg} (got {_shown(err.get('input'))})")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def build_config(data: dict[str, Any]) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


def load_config(
    preset: str = "tiny",
    *,
    overrides: list[str] | tuple[str, ...] = (),
    config_file: str | Path | None = None,
    sets: list[str] | tuple[str, ...] = (),
    extra: dict[str, Any] | None = None,
) -> ExperimentConfig:
    """Resolve preset <- named overrides <- YAML file <- `extra` dict <- `--set` assignments."""
    if preset not in available_presets():
        raise ConfigError(f"preset: unknown preset {preset!r}; allowed: {', '.join(available_presets())}")
    data = _read_yaml(PRESETS_DIR / f"{preset}.yaml", f"preset {preset}")
    data["preset"] = preset
    for name in overrides:
        if name not in available_overrides():
            raise ConfigError(f"override: unknown named override {name!r}; allowed: {', '.join(available_overrides())}")
        data = deep_merge(data, _read_yaml(OVERRIDES_DIR / f"{name}.yaml", f"override {name}"))
    if config_file is not None:
        data = deep_merge(data, _read_yaml(Path(config_file), "config file"))
    if extra:
        data = deep_merge(data, extra)
    for assignment in sets:
        data = deep_merge(data, parse_set(assignment))
    return build_config(data)


def config_to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def check_output_folders(cfg: ExperimentConfig, *, results: bool = True) -> None:
    """Refuse output folders that cannot be written before any compute, naming the setting:
    otherwise a read-only `paths.results_root` would only surface in stage 7, after every seed
    has trained and been attacked. Checks the nearest existing folder of each path (nothing is
    created here) for write permission and a read-only file system."""
    settings = {"paths.runs_root": cfg.paths.runs_root}
    if results:
        settings["paths.results_root"] = cfg.paths.results_root
    for setting, path in settings.items():
        probe = nearest_existing(path)
        if not probe.is_dir():
            raise ConfigError(f"{setting}={str(path)!r}: {probe} exists and is not a folder")
        if os.statvfs(probe).f_flag & os.ST_RDONLY:
            raise ConfigError(f"{setting}={str(path)!r}: cannot write under {probe} (read-only file system)")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise ConfigError(f"{setting}={str(path)!r}: cannot write under {probe} (permission denied)")
