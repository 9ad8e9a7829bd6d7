"""Reading a plugin's files safely: never a special file, never more than a limit.

Guarantee: the loader opens only *regular* files of a plugin folder, and reads at most
``limit`` bytes of each; a FIFO, socket or device (which could block a read forever or
never end) is reported, not opened, and a file name that is not valid UTF-8 is shown
escaped (``'bad\\udcff.py'`` becomes ``'bad\\xff.py'``) so messages and events can
carry it.

Mechanism: ``os.lstat`` before opening (no link is followed), then ``open`` with
``O_NONBLOCK | O_NOFOLLOW`` and an ``fstat`` of the opened descriptor (a file swapped
for a FIFO between the two checks is still refused), then a bounded read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = [
    "MAX_DEPTH",
    "FileRefused",
    "kind",
    "printable",
    "read_limited",
    "regular_files",
    "too_deep",
]

#: Largest plugin source, manifest or config file the loader reads (bytes).
DEFAULT_LIMIT = 8 * 1024 * 1024
#: Deepest folder of a plugin that is walked (levels below the plugin's folder).
MAX_DEPTH = 64


class FileRefused(Exception):
    """A plugin file cannot be read (special file, too large, unreadable); says why."""


def printable(name: str) -> str:
    """``name`` with undecodable bytes (surrogate escapes) shown as ``\\xNN``."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")
    return name


def kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def read_limited(path: Path, limit: int = DEFAULT_LIMIT) -> bytes:
    """The bytes of the regular file ``path``; raises FileNotFoundError or FileRefused."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise FileRefused(f"is {kind(st.st_mode)}; only regular files are read")
    if st.st_size > limit:
        raise FileRefused(f"is {st.st_size} bytes, more than the limit of {limit}")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise FileRefused(f"cannot be opened: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FileRefused("changed into a special file while being read")
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise FileRefused(f"is more than the limit of {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def regular_files(folder: Path, skip: tuple[str, ...] = ()) -> tuple[list[Path], list[Path]]:
    """``(regular files, other entries)`` under ``folder``, hidden ones and ``skip`` left out.

    Nothing is opened; links are not followed (a link counts among the others), and a
    folder more than :data:`MAX_DEPTH` levels down is not entered (it counts among the
    others too: see :func:`too_deep`). The walk keeps its own stack, so no depth of
    folders can exhaust the interpreter's recursion limit.
    """
    files: list[Path] = []
    others: list[Path] = []
    stack: list[tuple[Path, int]] = [(folder, 0)]
    while stack:
        base, depth = stack.pop()
        try:
            with os.scandir(base) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue  # vanished or unreadable: what reads it next reports it
        subfolders: list[Path] = []
        for entry in entries:
            n = entry.name
            path = base / n
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
            except OSError:
                continue
            if stat.S_ISDIR(mode):
                if n in skip or n.startswith("."):
                    continue
                if depth + 1 > MAX_DEPTH:
                    others.append(path)
                else:
                    subfolders.append(path)
            elif n.endswith((".pyc", ".pyo")) or n in skip:
                continue
            else:
                (files if stat.S_ISREG(mode) else others).append(path)
        stack.extend((sub, depth + 1) for sub in reversed(subfolders))
    return files, others


def too_deep(folder: Path, path: Path) -> bool:
    """Whether ``path`` (an entry :func:`regular_files` put aside) is a folder too deep."""
    try:
        return (
            stat.S_ISDIR(os.lstat(path).st_mode) and len(path.relative_to(folder).parts) > MAX_DEPTH
        )
    except (OSError, ValueError):
        return False
