"""What produced an artifact: package versions, git revision, and a digest of the library code.

The code digest is part of every stage's cache key: hashing only a task function's own source
misses edits to the `monolm` helpers it calls (Prefect's TASK_SOURCE policy returns stale results).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

PACKAGE_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_ROOT.parent


@functools.lru_cache(maxsize=1)
def git_revision() -> str:
    """`<sha>` or `<sha>-dirty`; `unknown` outside a git checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        return f"{sha}-dirty" if dirty else sha
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("monolm", "torch", "transformers", "tokenizers", "datasets", "safetensors", "prefect"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


def provenance() -> dict[str, Any]:
    """Code and place of an artifact: git revision, versions, and where it ran (host, SLURM job,
    visible GPUs), so a cluster run's manifests name the job that wrote them."""
    return {
        "git_revision": git_revision(),
        "versions": package_versions(),
        "platform": sys.platform,
        "host": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


def code_digest(*modules: str) -> str:
    """sha256 over the source of the given `monolm` modules (dotted names relative to `monolm`,
    e.g. "training", "attacks"; a package name covers all its files). Empty -> whole library."""
    paths: list[Path] = []
    targets = modules or ("",)
    for name in targets:
        base = PACKAGE_ROOT.joinpath(*name.split(".")) if name else PACKAGE_ROOT
        if base.is_dir():
            paths.extend(sorted(base.rglob("*.py")))
        elif base.with_suffix(".py").is_file():
            paths.append(base.with_suffix(".py"))
        else:
            raise ValueError(f"code_digest: no monolm module named {name!r}")
    h = hashlib.sha256()
    for path in sorted(set(paths)):
        h.update(str(path.relative_to(PACKAGE_ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]
