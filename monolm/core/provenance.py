"""What produced an artifact: package versions, git revision, and where it ran (the code digest
that keys a stage's cache is `monolm.core.code_digest`)."""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


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
