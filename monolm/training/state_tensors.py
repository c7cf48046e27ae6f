"""Optimizer, scheduler and RNG states as safetensors plus JSON (nothing pickled), so that a
checkpoint restores them exactly; the checkpoint's files and their checks are `checkpoint`."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monolm.core.artifacts import CorruptArtifact
from monolm.core.errors import PermanentError

log = logging.getLogger("monolm.checkpoint")

OPTIMIZER_JSON = "optimizer.json"


class CheckpointMismatch(PermanentError, ValueError):
    """The checkpoint belongs to a different model, recipe or run than the one resuming it."""


# --------------------------------------------------------------------------- optimizer <-> safe files
def optimizer_to_safe(
    optimizer: torch.optim.Optimizer, param_names: Sequence[str], scheduler: Any | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split `optimizer.state_dict()` into tensors (keyed by parameter *name*, not index) and JSON."""
    sd = optimizer.state_dict()
    n_params = sum(len(g["params"]) for g in sd["param_groups"])
    if n_params != len(param_names):
        raise ValueError(f"optimizer has {n_params} parameters but {len(param_names)} names were given")
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        name = param_names[idx]
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{name}/{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(name, {})[key] = value
    groups = []
    for group in sd["param_groups"]:
        g = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
        g["params"] = [param_names[i] for i in group["params"]]
        groups.append(g)
    meta = {
        "param_names": list(param_names),
        "param_groups": groups,
        "scalar_state": scalars,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
    }
    return tensors, meta


def optimizer_from_safe(
    optimizer: torch.optim.Optimizer,
    param_names: Sequence[str],
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    scheduler: Any | None = None,
) -> None:
    """Inverse of `optimizer_to_safe`; the optimizer must have been built over `param_names`."""
    if list(meta["param_names"]) != list(param_names):
        raise CheckpointMismatch("optimizer parameters differ from the checkpoint's (order or names)")
    index = {name: i for i, name in enumerate(param_names)}
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, rest = key.split("/", 1)
        name, field = rest.rsplit("/", 1)
        state.setdefault(index[name], {})[field] = value
    for name, fields in meta["scalar_state"].items():
        state.setdefault(index[name], {}).update(fields)
    groups = []
    for group in meta["param_groups"]:
        g = dict(group)
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
        g["params"] = [index[n] for n in group["params"]]
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    if scheduler is not None:
        if meta.get("scheduler") is None:
            raise CorruptArtifact(Path(OPTIMIZER_JSON), "no scheduler state recorded")
        scheduler.load_state_dict(meta["scheduler"])


# --------------------------------------------------------------------------- RNG
def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every RNG a training step may draw from: Python, NumPy, torch CPU and each CUDA device."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda/{i}"] = s
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss},
        "numpy": {
            "kind": np_state[0],
            "keys": [int(x) for x in np_state[1]],
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    py = meta["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npm = meta["numpy"]
    np.random.set_state(
        (npm["kind"], np.asarray(npm["keys"], dtype=np.uint32), npm["pos"], npm["has_gauss"], npm["cached_gaussian"])
    )
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda/")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning(
                "checkpoint has %d CUDA RNG states but %d devices are visible; CUDA RNG not restored",
                len(cuda),
                torch.cuda.device_count(),
            )
