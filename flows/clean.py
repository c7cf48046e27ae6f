"""`monolm clean`: list (and with `--yes` remove) superseded stage results.

A config change moves a stage's earlier folder aside instead of deleting it
(`monolm/study/frame.py`): a finished result to `<stage>.superseded-<work key>`, which a run reuses
when the config returns to it, unfinished work to `<stage>.superseded-<time>`. They pile up; this
command shows what they hold and how much disk, and deletes them only when asked (a dry run by
default, because a deleted result is hours of GPU time to recompute).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def superseded_folders(root: Path) -> list[Path]:
    """Every superseded stage folder under `root` (stage folders sit a few levels down), sorted."""
    from monolm.study.frame import SUPERSEDED  # here: `monolm --help` and a bad config never wait for torch

    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob(f"*{SUPERSEDED}*") if p.is_dir() and not p.is_symlink())


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _kind(folder: Path) -> str:
    """ "finished" (a run with the same config reuses it) or "unfinished" (kept as evidence only)."""
    return "finished" if (folder / "manifest.json").is_file() else "unfinished"


def cmd_clean(args: argparse.Namespace) -> int:
    root = Path(args.runs_root)
    folders = superseded_folders(root)
    if not folders:
        print(f"no superseded stage results under {root}")
        return 0
    total = 0
    for folder in folders:
        size = _size(folder)
        total += size
        print(f"{size / 2**20:10.1f} MiB  {_kind(folder):<10}  {folder}")
    print(f"{len(folders)} superseded folder(s), {total / 2**20:.1f} MiB")
    if not args.yes:
        print("dry run: nothing removed (a finished one is reused when a run returns to its config); --yes removes")
        return 0
    for folder in folders:
        shutil.rmtree(folder)
    print(f"removed {len(folders)} folder(s)")
    return 0


def add_clean_parser(sub: argparse._SubParsersAction) -> None:
    clean = sub.add_parser("clean", help="list superseded stage results (<stage>.superseded-*); --yes removes them")
    clean.add_argument("--runs-root", default="runs", help="the runs folder (paths.runs_root, default runs)")
    clean.add_argument("--yes", action="store_true", help="remove them (default: a dry run that only lists)")
    clean.set_defaults(func=cmd_clean)
