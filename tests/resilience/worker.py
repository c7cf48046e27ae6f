"""What the resilience tests run in a *separate process* so they can really SIGKILL it.

Two modes:
- `train`: `monolm.training.train()` on a tiny GPT-NeoX (dropout on, so a resume that lost an
  RNG state would diverge) for a fixed recipe; the parent compares the files it leaves with an
  uninterrupted run's.
- `cli`: `flows.cli.main(argv)`, i.e. exactly what a user runs (`monolm run --no-prefect ...`).

Three instruments, all off unless the spec asks for them:
- a *pause point*: the n-th call of a named function whose path arguments match a regex writes a
  marker file and then blocks until the parent SIGKILLs the process. That is how a kill lands
  deterministically *inside* a checkpoint write, a unit write or a directory swap, instead of
  hoping a timer hits a window of a few milliseconds. It does not change what the code does.
- an *audit log* (`sys.addaudithook`): every file open, rename, mkdir and removal under a root,
  one JSON line each, written immediately (a killed process leaves a complete log). The parent
  uses it to prove which files a process read and wrote. It does not change what the code does.
- an *injected fault*, the one mock of the suite: the n-th matching call raises
  OSError(ENOSPC), as a write on a full disk does (used where a real full tmpfs cannot aim at one
  particular write).
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------- instruments
_AUDIT_EVENTS = {"open", "os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"}


def install_audit(log_path: str, root: str) -> None:
    """Append {"event", "paths", "mode", "flags"} for every audited file operation under `root`."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    root = os.path.realpath(root)
    busy = [False]

    def as_path(value: Any) -> str | None:
        if isinstance(value, (str, bytes, os.PathLike)):
            try:
                return os.path.abspath(os.fsdecode(value))
            except (TypeError, ValueError):
                return None
        return None

    def hook(event: str, args: tuple) -> None:
        if event not in _AUDIT_EVENTS or busy[0]:
            return
        busy[0] = True
        try:
            paths = [as_path(args[0]), as_path(args[1])] if event == "os.rename" else [as_path(args[0])] if args else []
            paths = [p for p in paths if p]
            if not paths or not any(p.startswith(root) for p in paths):
                return
            record = {"event": event, "paths": paths, "pid": os.getpid()}
            if event == "open":
                record["mode"] = args[1] if len(args) > 1 and isinstance(args[1], str) else None
                record["flags"] = args[2] if len(args) > 2 and isinstance(args[2], int) else None
            os.write(fd, (json.dumps(record) + "\n").encode())
        finally:
            busy[0] = False

    sys.addaudithook(hook)


def _resolve(target: str) -> tuple[Any, str]:
    """ "module:attr" or "module:Class.attr" -> (owner object, attribute name)."""
    module, _, attr = target.partition(":")
    owner: Any = importlib.import_module(module)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, name


def install_fault(spec: dict[str, Any]) -> None:
    """Make the `nth` call of `target` whose path arguments match `match` raise
    OSError(`errno`) instead of running: a write that fails for lack of space (ENOSPC), exactly
    as the kernel reports it to Python."""
    owner, attr = _resolve(spec["target"])
    original = getattr(owner, attr)
    nth, match, code = spec.get("nth", 1), spec.get("match", ""), spec.get("errno", errno.ENOSPC)
    seen = [0]

    def wrapper(*args, **kwargs):
        names = [str(a) for a in (*args, *kwargs.values()) if isinstance(a, (str, os.PathLike))]
        if re.search(match, " ".join(names)):
            seen[0] += 1
            if seen[0] == nth:
                raise OSError(code, os.strerror(code), names[0] if names else None)
        return original(*args, **kwargs)

    setattr(owner, attr, wrapper)


def install_pause(spec: dict[str, Any]) -> None:
    """Wrap `spec["target"]` ("module:function"); on the `nth` call whose path-like arguments
    match the regex `match` (searched in their space-joined text), call through first when
    `when == "after"`, write `marker`, then block."""
    owner, attr = _resolve(spec["target"])
    original = getattr(owner, attr)
    nth, match, when, marker = spec.get("nth", 1), spec.get("match", ""), spec.get("when", "before"), spec["marker"]
    seen = [0]

    def block(args: tuple) -> None:
        names = [str(a) for a in args if isinstance(a, (str, os.PathLike))]
        Path(marker).write_text(json.dumps({"target": spec["target"], "args": names, "pid": os.getpid()}))
        signal.alarm(300)  # never outlive a parent that forgot to kill us
        while True:
            signal.pause()

    def wrapper(*args, **kwargs):
        text = " ".join(str(a) for a in (*args, *kwargs.values()) if isinstance(a, (str, os.PathLike)))
        hit = False
        if re.search(match, text):
            seen[0] += 1
            hit = seen[0] == nth
        if hit and when == "before":
            block(args)
        result = original(*args, **kwargs)
        if hit and when == "after":
            block(args)
        return result

    setattr(owner, attr, wrapper)


def pause_here(marker: str, info: dict[str, Any]) -> None:
    Path(marker).write_text(json.dumps({**info, "pid": os.getpid()}))
    signal.alarm(300)
    while True:
        signal.pause()


# --------------------------------------------------------------------------- the tiny training run
from helpers import VOCAB  # noqa: E402  (the suite's tiny GPT-NeoX and toy corpus)


def tiny_model(*, hidden: int = 64, constrained: bool = False):
    """The suite's tiny GPT-NeoX, with dropout on: a resume that failed to restore the RNG diverges."""
    from helpers import tiny_neox

    return tiny_neox(hidden=hidden, dropout=0.1, constrained=constrained)


def tiny_data(n: int = 40, seed: int = 1):
    from helpers import counter_blocks

    return counter_blocks(n, seed)


def tiny_arm(**overrides):
    from helpers import resume_recipe

    return resume_recipe(**{"log_every_steps": 1, "checkpoint_every_steps": 3, **overrides})


def run_train(spec: dict[str, Any]) -> int:
    import math

    import torch
    import torch.nn.functional as F

    from monolm.training import train

    torch.set_num_threads(1)
    held_out = tiny_data(8, seed=99)

    def evaluate(model) -> dict:
        logits = model(input_ids=held_out, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), held_out[:, 1:].reshape(-1)).item()
        return {"loss": loss, "perplexity": math.exp(loss)}

    pause_step = spec.get("pause_step")

    def on_log(entry: dict) -> None:
        if pause_step is not None and entry["kind"] == "train" and entry["step"] == pause_step:
            pause_here(spec["marker"], {"step": entry["step"]})

    # A new process starts from arbitrary global RNG states; a resume must not depend on them.
    torch.manual_seed(int(time.time_ns() % 2**31))
    model = tiny_model(hidden=spec.get("hidden", 64), constrained=spec.get("constrained", False))
    result = train(
        model,
        tiny_data(seed=spec.get("data_seed", 1)),
        tiny_arm(**spec.get("arm", {})),
        Path(spec["out"]),
        seed=5,
        evaluate=evaluate,
        constrained=spec.get("constrained", False),
        device="cpu",
        progress=False,
        on_log=on_log,
    )
    print(
        json.dumps(
            {
                "steps": result.steps,
                "completed": result.completed,
                "resumed_from": str(result.resumed_from) if result.resumed_from else None,
            }
        )
    )
    return 0


# --------------------------------------------------------------------------- entry points
def child_main(mode: str, spec: dict[str, Any]) -> int:
    """Run one mode with the instruments the spec asks for (the process's stdio is the caller's)."""
    os.environ.update(spec.get("env", {}))
    if spec.get("audit"):
        install_audit(spec["audit"]["log"], spec["audit"]["root"])
    for pause in spec.get("pauses", []):
        install_pause(pause)
    for fault in spec.get("faults", []):
        install_fault(fault)
    if mode == "train":
        return run_train(spec)
    if mode == "cli":
        from flows.cli import main

        return main(spec["argv"])
    raise SystemExit(f"unknown mode {mode!r}")


def forked_entry(mode: str, spec: dict[str, Any], log_path: str) -> None:
    """Target of a forkserver child: stdout/stderr to `log_path`, exit with the mode's status."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    import logging

    from monolm.core.logs import setup_logging

    setup_logging(logging.INFO)
    try:
        code = child_main(mode, spec)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _mode, _spec = sys.argv[1], json.loads(sys.argv[2])
    if _mode == "train":
        import logging

        from monolm.core.logs import setup_logging

        setup_logging(logging.INFO)
    sys.exit(child_main(_mode, _spec))
