"""Resumable units of attack work, one self-verifying file each.

Why: a UAT restart or a block of HotFlip examples on a 1.4B model takes minutes to hours, and
jobs get preempted. Each finished unit is written atomically (temp file + fsync + rename) as
`<out_dir>/units/<kind>-<index>.json`:

    {"kind": ..., "index": ..., "key": <run key>, "sha256": <digest of payload>, "payload": {...}}

A re-run reuses a unit only if its file parses, its payload still matches the recorded sha256
(a truncated or altered file is recomputed, with a warning) and its `key` equals the current run
key (a digest of everything the unit's result depends on: attack config, seed, model fingerprint,
texts, allowed vocabulary). Callers always build final results from the JSON round-tripped
payload, so an interrupted-and-resumed run gives exactly the result of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monolm.core.artifacts import atomic_write_json

log = logging.getLogger("monolm.attacks")
UNITS_DIR = "units"


def unit_path(out_dir: str | Path, kind: str, index: int) -> Path:
    return Path(out_dir) / UNITS_DIR / f"{kind}-{index:04d}.json"


def roundtrip(payload: Any) -> Any:
    """The payload exactly as it will read back from disk (floats survive JSON via repr)."""
    return json.loads(canonical_json(payload))


def write_unit(out_dir: str | Path, kind: str, index: int, key: str, payload: Any) -> Any:
    """Write one finished unit atomically; return the round-tripped payload."""
    payload = roundtrip(payload)
    atomic_write_json(
        unit_path(out_dir, kind, index),
        {"kind": kind, "index": index, "key": key, "sha256": digest_json(payload), "payload": payload},
    )
    return payload


def read_unit(out_dir: str | Path, kind: str, index: int, key: str) -> Any | None:
    """The payload of a valid finished unit for this run key, else None (missing, corrupt -> warn,
    or computed for different inputs)."""
    path = unit_path(out_dir, kind, index)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_bytes())
        payload = record["payload"]
        ok = (
            record.get("kind") == kind and record.get("index") == index and record.get("sha256") == digest_json(payload)
        )
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        ok = False
    if not ok:
        log.warning("unit %s is corrupt or truncated; recomputing it", path)
        return None
    if record.get("key") != key:
        log.info("unit %s belongs to a different run (config, model or texts changed); recomputing", path)
        return None
    return payload


def trigger_run_key(model: nn.Module, opt_texts, cfg, *, kind: str, seed: int, prefix, allowed: torch.Tensor) -> str:
    """Digest of everything a universal-trigger restart's result depends on (UAT's and GCG's):
    the attack, its settings, the seed, the model, the optimisation texts, the context prefix and
    the allowed tokens."""
    return digest_json(
        {
            "attack": kind,
            "cfg": cfg.model_dump(mode="json"),
            "seed": seed,
            "model": model_fingerprint(model),
            "opt_texts": digest_json([list(t) for t in opt_texts]),
            "prefix": list(prefix),
            "allowed": digest_json(torch.nonzero(allowed).flatten().tolist()),
        }
    )


def model_fingerprint(model: nn.Module, sample: int = 512) -> str:
    """A cheap digest that tells trained models apart (names, shapes, and the first and last
    `sample` values of every tensor), used to key resumable units: a unit computed on another
    model is never reused. Hashing all weights of a 1.4B model would cost more than a unit."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(str(tensor.dtype).encode())
        head = flat[:sample].float().cpu().numpy().tobytes()
        tail = flat[-sample:].float().cpu().numpy().tobytes()
        h.update(head)
        h.update(tail)
    return h.hexdigest()


def digest_json(obj: Any) -> str:
    """sha256 of a canonical JSON encoding (sorted keys, no whitespace)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
