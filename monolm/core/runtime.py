"""Device, precision and seeding helpers shared by every stage.

Device-agnostic by design: `cuda` when present, CPU otherwise. Parameters and optimizer state are
always fp32; bf16 is used only as autocast compute on CUDA (pure-bf16 AdamW silently drops
updates smaller than bf16's spacing, which froze the original study's constrained weights).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
from collections.abc import Iterator

import numpy as np
import torch

from monolm.config.schema import Switch

log = logging.getLogger("monolm.runtime")

# The one name of the bf16 setting (training arms, evaluation, attacks); `bf16_enabled` resolves it.
Bf16 = Switch  # a bf16 setting: auto, on or off


def pick_device(preferred: str | None = None) -> torch.device:
    """`MONOLM_DEVICE` or `preferred` if given, else cuda when available, else cpu."""
    name = preferred or os.environ.get("MONOLM_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_flag(setting: Switch, device: torch.device) -> bool:
    """`auto` means on for CUDA only (bf16 autocast, gradient checkpointing)."""
    if setting == "auto":
        return device.type == "cuda"
    return setting == "on"


def bf16_enabled(setting: Bf16, device: torch.device, *, cuda_only: bool = False) -> bool:
    """The resolved `bf16` setting: whether compute on `device` runs under bf16 autocast.

    `auto` is on for CUDA only; `on` and `off` are what they say. With `cuda_only` (scoring:
    evaluation and the attacks), `on` is on for CUDA only too: elsewhere the scores are computed
    in fp32, with a warning that the setting was not honoured.
    """
    if cuda_only and setting == "on" and device.type != "cuda":
        log.warning("bf16 autocast is used on CUDA only when scoring; computing in fp32 on %s", device)
        return False
    return resolve_flag(setting, device)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast for compute only; a no-op context when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def derive_seed(seed: int, *tags: str | int) -> int:
    """A stable 63-bit seed from (seed, stage, restart, ...): independent streams per unit of work,
    reproducible across processes (Python's hash() is salted per process; sha256 is not)."""
    payload = ":".join([str(seed), *map(str, tags)]).encode()
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "big") & ((1 << 63) - 1)


def generator(seed: int, *tags: str | int, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, *tags))
    return g


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic(enabled: bool = True) -> Iterator[None]:
    """Deterministic kernels (bitwise-reproducible CPU runs for resume tests)."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=True)


_threads_configured = False


def configure_threads() -> int:
    """Set torch's intra-op threads once per process: `MONOLM_TORCH_THREADS`, else half the cores.

    Why: stages 2||3 and 5||6 run concurrently, and processes whose OpenMP threads together
    oversubscribe the cores spin against each other and run many times slower than one thread
    each (docs/running.md, "Profiles").
    """
    global _threads_configured
    if not _threads_configured:
        default = max(1, (os.cpu_count() or 2) // 2)
        torch.set_num_threads(int(os.environ.get("MONOLM_TORCH_THREADS", default)))
        _threads_configured = True
    return torch.get_num_threads()


def model_device(model: torch.nn.Module) -> torch.device:
    """Where `model`'s parameters live (CPU for a model without parameters)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`model.eval()` for the duration, then the training flag it had before (also on error):
    evaluation and attacks run on a model whose caller may be in the middle of training it."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def is_oom(exc: BaseException) -> bool:
    """True for a device out-of-memory error (CUDA raises `torch.OutOfMemoryError`; some kernels
    and other backends raise a plain RuntimeError saying so): the callers back off and retry
    with a smaller batch instead of failing the stage."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
