"""The files around an SQLite log, and what they prove about its past.

Guarantee: the store never starts a new empty log, or a log that lost acknowledged
events, in silence. Mechanism:

- ``<log>.mark`` (JSON, written atomically and fsynced, mode 0600) holds the position
  the writer had *acknowledged* when it wrote the mark — at open, about once a second
  while appends commit, and at a clean stop (then with ``clean: true``). A log that
  reopens ending before that position lost acknowledged events: it is refused.
- A ``-wal`` present at open, or a mark without ``clean``, means the last stop was not
  clean: the ``-wal`` is copied to ``<log>-wal.unclean`` *before* SQLite reads (and
  rewrites) it, and the copy is kept until the next clean stop, for a post-mortem.
- A missing or empty log next to a mark, a ``-wal`` or another sign that the data folder
  was used (the admin token's hash) is refused: the log was lost, not never created.

Every file the store creates is readable by its owner only (the folder 0700, files 0600).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import orjson

from kernel.errors import StoreCorrupt

__all__ = ["PRIOR_USE", "LogFiles", "Mark"]

log = logging.getLogger("xcore.store")

#: Files in a data folder that show the kernel ran there before (besides the log's own).
PRIOR_USE: Final = ("admin-token.sha256",)
FILE_MODE: Final = 0o600
DIR_MODE: Final = 0o700


@dataclass(frozen=True, slots=True)
class Mark:
    """The last position the writer acknowledged, and whether it stopped cleanly."""

    position: int
    clean: bool
    at: float


class LogFiles:
    """Paths and checks of one log file and its companions."""

    def __init__(self, path: Path, evidence: Iterable[Path] = ()) -> None:
        self.path = path
        self.wal = path.with_name(path.name + "-wal")
        self.shm = path.with_name(path.name + "-shm")
        self.lock = path.with_name(path.name + ".lock")
        self.mark_path = path.with_name(path.name + ".mark")
        self.kept_wal = path.with_name(path.name + "-wal.unclean")
        self.evidence = [*evidence, *(path.parent / name for name in PRIOR_USE)]

    # -- the folder ------------------------------------------------------------------

    def make_folder(self) -> None:
        """Create the log's folder (owner only) if it does not exist yet."""
        folder = self.path.parent
        if not folder.exists():
            folder.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)

    def create_log(self) -> None:
        """Create the empty log file with owner-only permissions (SQLite gives its
        ``-wal`` and ``-shm`` the same mode)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        os.close(fd)

    @staticmethod
    def size(path: Path) -> int:
        try:
            return path.stat().st_size
        except FileNotFoundError:
            return -1

    # -- what the folder proves ------------------------------------------------------

    def check_not_lost(self, mark: Mark | None, *, allow_new_log: bool) -> None:
        """Refuse a missing or empty log in a folder that shows it existed."""
        if self.size(self.path) > 0:
            return
        if self.size(self.wal) > 0 and not allow_new_log:
            raise StoreCorrupt(
                f"{self.path} is missing or empty but its write-ahead log {self.wal.name} "
                f"exists: the log file was lost or deleted. Restore it (xcore restore) — "
                f"set allow_new_log (XCORE_ALLOW_NEW_LOG=1) only to start a new empty log"
            )
        candidates = dict.fromkeys([*([self.mark_path] if mark else []), *self.evidence])
        signs = [p for p in candidates if p.exists()]
        if signs and not allow_new_log:
            what = "missing" if self.size(self.path) < 0 else "empty"
            raise StoreCorrupt(
                f"{self.path} is {what} but this data folder was used before "
                f"({', '.join(p.name for p in signs)} exist"
                f"{f'; the log had reached position {mark.position}' if mark else ''}). "
                f"Restore the log (xcore restore) — set allow_new_log "
                f"(XCORE_ALLOW_NEW_LOG=1) only to start a new empty log on purpose"
            )

    def unclean(self, mark: Mark | None) -> bool:
        """Whether the last writer did not stop cleanly (a ``-wal`` left, or no clean mark)."""
        return self.size(self.wal) > 0 or (mark is not None and not mark.clean)

    def keep_wal(self) -> Path | None:
        """Copy the ``-wal`` aside, as it is, before SQLite recovers and rewrites it."""
        if self.size(self.wal) <= 0:
            return None
        tmp = self.kept_wal.with_name(self.kept_wal.name + ".tmp")
        shutil.copyfile(self.wal, tmp)
        os.chmod(tmp, FILE_MODE)
        _fsync_file(tmp)
        os.replace(tmp, self.kept_wal)
        _fsync_dir(self.path.parent)
        return self.kept_wal

    def drop_kept_wal(self) -> None:
        try:
            self.kept_wal.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove the kept copy %s: %s", self.kept_wal, exc)

    # -- the mark --------------------------------------------------------------------

    def read_mark(self) -> Mark | None:
        if self.mark_path.exists() and not self.mark_path.is_file():
            raise StoreCorrupt(f"{self.mark_path} (the log's mark) is not a regular file")
        try:
            raw = self.mark_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            data = orjson.loads(raw)
            return Mark(int(data["position"]), bool(data["clean"]), float(data["at"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise StoreCorrupt(
                f"{self.mark_path} (the log's acknowledged-position mark) is damaged: {exc!r}; "
                f"remove it only if {self.path} is known to be complete"
            ) from exc

    def write_mark(self, position: int, *, clean: bool) -> None:
        """Durably record that ``position`` was acknowledged (blocking: run in a thread)."""
        body = orjson.dumps({"position": position, "clean": clean, "at": time.time()})
        tmp = self.mark_path.with_name(self.mark_path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.mark_path)
        _fsync_dir(self.path.parent)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems refuse fsync on a folder
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
