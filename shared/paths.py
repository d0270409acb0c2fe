"""Input paths the orchestrator refuses before it reads them: empty ones, kernel/device trees, non-regular files.

`--data ""` would otherwise mean the current folder; a path under /proc, /sys or /dev (given, or reached through a
symlink) reads process memory maps, environments or endless devices; a FIFO blocks the reader forever. Each refusal
is one line naming the path.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from shared.errors import UserError

#: Trees that hold no datasets: kernel and device views whose files can block, never end, or leak secrets.
SYSTEM_ROOTS = ("/proc", "/sys", "/dev")


def system_root(path: str | Path) -> str | None:
    """The system tree (/proc, /sys, /dev) that `path` lies in, as written or once symlinks are followed."""
    written = os.path.abspath(os.path.expanduser(str(path)))
    try:
        real = os.path.realpath(written)
    except (OSError, ValueError):  # a symlink loop on some Pythons; the written path still counts
        real = written
    for p in (written, real):
        for root in SYSTEM_ROOTS:
            if p == root or p.startswith(root + "/"):
                return root
    return None


def check_input_path(flag: str, value: str | None) -> None:
    """UserError for an empty path or one inside /proc, /sys or /dev (given by `flag`, e.g. --data)."""
    if value is None:
        return
    if not value.strip():
        raise UserError(f"{flag} is empty: give a path (an empty one would mean the current folder)")
    root = system_root(value)
    if root is not None:
        raise UserError(f"{flag} {value} lies under {root}, a system tree that holds no datasets: "
                        "copy the files into a normal folder")


def not_regular(path: Path) -> str | None:
    """Why `path` is not a regular file that can be read as an image (None when it is one)."""
    try:
        st = path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symlink loop"
        if os.path.islink(path):
            return f"is a dangling symlink (its target {os.readlink(path)} does not exist)"
        if e.errno == errno.ENOENT:
            return "does not exist"
        return f"cannot be read ({e.strerror})"
    root = system_root(path)
    if root is not None:
        return f"points into {root}, a system tree"
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return None
    kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
            else "a folder" if stat.S_ISDIR(mode) else "not a regular file")
    return f"is {kind}, not an image file"
