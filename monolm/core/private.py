"""Folders only their owner can enter: scratch for locks and sockets, TLS keys, service state.

On a shared login node `/tmp` is everyone's: a predictable name there (`/tmp/monolm-stage-<key>.lock`)
can be created first by another user, who then holds the lock, reads what is written into it, or
swaps it for a link. So everything monolm keeps outside its own folders goes into one folder per
user, mode 0700, that is checked before every reuse: it must be a real folder (not a link), owned
by this user, and open to nobody else. A folder that fails the check is refused, never repaired
or reused: whoever made it may still hold files inside it.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

SCRATCH_ENV = "MONOLM_SCRATCH"


class UnsafeFolderError(PermissionError):
    """A folder that must be private to this user is not (wrong owner, open mode, or a link)."""


def check_private_dir(path: Path) -> Path:
    """Raise `UnsafeFolderError` unless `path` is a folder (not a symlink) owned by this user with
    no permission for group or others. Returns `path`."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise UnsafeFolderError(f"private folder {path} does not exist") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise UnsafeFolderError(
            f"private folder {path} is a link or a file, not a folder; remove it or set {SCRATCH_ENV} to another"
        )
    if st.st_uid != os.getuid():
        raise UnsafeFolderError(
            f"private folder {path} belongs to user id {st.st_uid}, not to you ({os.getuid()}): someone else "
            f"created it; remove it or set {SCRATCH_ENV} to a folder of your own"
        )
    if st.st_mode & 0o077:
        raise UnsafeFolderError(
            f"private folder {path} has mode {stat.S_IMODE(st.st_mode):04o}, open to other users: it must be "
            f"0700 (run `chmod 700 {path}` if you trust what is inside, else remove it)"
        )
    return path


def private_dir(path: str | Path) -> Path:
    """`path` as a private folder: created with mode 0700 (its missing parents with the umask) when
    absent, checked (`check_private_dir`) when it exists. Never loosens or tightens an existing
    folder: one created by someone else must not be adopted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    else:
        os.chmod(path, 0o700)  # mkdir's mode is masked by the umask; 0700 is what we mean
    return check_private_dir(path)


def private_scratch() -> Path:
    """This user's scratch folder for locks and sockets: `$MONOLM_SCRATCH`, else
    `<temp dir>/monolm-<uid>` (short, so UNIX socket paths inside it fit 108 bytes), private and
    checked on every call."""
    configured = os.environ.get(SCRATCH_ENV)
    if configured:
        return private_dir(Path(configured).expanduser())
    return private_dir(Path(tempfile.gettempdir()) / f"monolm-{os.getuid()}")


def own_state_dir(path: str | Path, *, keep_search: bool = False) -> Path:
    """A state folder of this user's (run history, the Prefect database): created 0700, or, when it
    exists and is ours, with group's and others' permissions taken away (a checkout from before
    this rule; the user's own folder, unlike a shared scratch name, is safe to tighten).
    `keep_search` leaves search (x) bits, which the infra scripts grant on `.state` to the
    `postgres` user when run as root. A folder owned by someone else is refused."""
    path = Path(path)
    if not path.exists():
        private_dir(path)
        return path
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.getuid():
        return check_private_dir(path)  # raises with the reason
    drop = 0o066 if keep_search else 0o077
    if st.st_mode & drop:
        os.chmod(path, stat.S_IMODE(st.st_mode) & ~drop)
    return path


def own_private_files(folder: Path, pattern: str) -> None:
    """Take group's and others' permissions away from this user's files matching `pattern` in
    `folder` (a Prefect database created before its folder was private)."""
    for f in folder.glob(pattern):
        with contextlib.suppress(OSError):
            if f.is_file() and not f.is_symlink() and f.stat().st_uid == os.getuid():
                f.chmod(stat.S_IMODE(f.stat().st_mode) & ~0o077)


def make_private_dirs(path: str | Path) -> Path:
    """Create `path` and its missing parents with mode 0700 (those that exist are left as they
    are): for folders other code would create with the umask, like dask-jobqueue's worker logs."""
    path = Path(path).expanduser().absolute()
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder, 0o700)
            os.chmod(folder, 0o700)
    return path
