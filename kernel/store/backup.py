"""Copying a log: an online backup, and a restore that leaves a log the store accepts.

Guarantee: ``backup`` writes a self-contained, verified copy of the log as it was at one
instant (a consistent snapshot, even while the kernel appends), and ``restore`` puts a
verified copy in place so that the kernel opens it without complaint — never over a log
that a kernel holds, and never losing the log it replaces.

Mechanism: SQLite's online backup API copies the pages inside one read transaction (WAL
mode lets the writer go on meanwhile), into a temporary file that is checkpointed,
checked (``PRAGMA integrity_check`` and the store's own checks), fsynced and renamed into
place. A restore takes the log's writer lock (so it fails with StoreLocked while a kernel
runs), moves the old log and its ``-wal``/``-shm`` aside (``<log>.replaced-<time>``),
and writes the acknowledged-position mark of the restored copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from kernel.errors import StoreCorrupt, StoreError
from kernel.store.sqlite import SQLiteStore, _uri, check_file
from kernel.store.sqlite_files import FILE_MODE, LogFiles

__all__ = ["Copied", "backup", "restore", "verify"]


@dataclass(frozen=True, slots=True)
class Copied:
    """What a backup or restore wrote."""

    path: Path
    events: int
    last_position: int
    replaced: Path | None = None


def _copy(source: Path, target: Path) -> None:
    """Copy the log ``source`` (with its WAL) into the new file ``target``, consistently."""
    check_file(source)
    files = LogFiles(source)
    lock = _try_lock(files.lock)
    # No writer holds the log (or none ever did): read the file as it is, leaving no
    # -wal/-shm behind. A writer holds it: read through SQLite's locks (its -wal exists).
    idle = lock is not None or not files.lock.exists()
    mode = "immutable=1" if idle and not files.wal.exists() else "mode=ro"
    try:
        src = sqlite3.connect(f"{_uri(source)}?{mode}", uri=True)
    except sqlite3.Error as exc:
        if lock is not None:
            os.close(lock)
        raise StoreError(f"{source}: cannot open the event log: {exc}") from exc
    try:
        fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)
        os.close(fd)
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)  # all pages in one step: one read transaction, one snapshot
            dst.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            dst.close()
    except sqlite3.DatabaseError as exc:
        raise StoreCorrupt(f"{source} cannot be copied, it is damaged: {exc}") from exc
    finally:
        src.close()
        if lock is not None:
            os.close(lock)
    for stale in (target.with_name(target.name + "-wal"), target.with_name(target.name + "-shm")):
        stale.unlink(missing_ok=True)
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _try_lock(path: Path) -> int | None:
    """The writer lock of a log if nobody holds it (released by closing the fd)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _integrity(path: Path) -> None:
    """``path`` is a fresh copy nobody writes: checked as it is, leaving no -wal/-shm."""
    conn = sqlite3.connect(f"{_uri(path)}?immutable=1", uri=True)
    try:
        problems = [row[0] for row in conn.execute("PRAGMA integrity_check")]
    except sqlite3.DatabaseError as exc:
        raise StoreCorrupt(f"{path} is damaged: {exc}") from exc
    finally:
        conn.close()
    if problems != ["ok"]:
        raise StoreCorrupt(f"{path} is damaged: {'; '.join(problems[:5])}")


async def verify(path: Path) -> tuple[int, int]:
    """Check ``path`` is an intact xcore log; return (events, last position)."""
    await asyncio.to_thread(_integrity, path)
    store = SQLiteStore(path, readonly=True)
    await store.open()
    try:
        last = await store.last_position()
        assert store._reader is not None
        row = await (await store._reader.execute("SELECT COUNT(*) FROM events")).fetchone()
        events = int(row[0]) if row else 0
    except sqlite3.DatabaseError as exc:
        raise StoreCorrupt(f"{path} is damaged: {exc}") from exc
    finally:
        await store.close()
    if events != last:
        raise StoreCorrupt(f"{path} has {events} events but ends at position {last}: gaps")
    return events, last


def _backup_target(source: Path, dest: Path, force: bool) -> Path:
    if not source.exists() or source.stat().st_size == 0:
        raise StoreError(f"{source}: no such event log")
    if dest.is_dir():
        dest = dest / source.name
    if dest.exists() and not force:
        raise StoreError(f"{dest} exists; pass --force to overwrite it")
    return dest


async def backup(source: Path, dest: Path, *, force: bool = False) -> Copied:
    """Copy the log ``source`` (running or not) to ``dest`` (a file, or a folder)."""
    dest = await asyncio.to_thread(_backup_target, source, dest, force)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        await asyncio.to_thread(_copy, source, tmp)
        events, last = await verify(tmp)
        os.replace(tmp, dest)
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
            leftover.unlink(missing_ok=True)
    _fsync_dir(dest.parent)
    return Copied(dest, events, last)


async def restore(source: Path, target: Path, *, force: bool = False) -> Copied:
    """Put a verified copy of ``source`` in place as the log ``target``."""
    if not await asyncio.to_thread(source.is_file):
        raise StoreError(f"{source}: no such file")
    await verify(source)
    files = LogFiles(target)
    files.make_folder()
    store = SQLiteStore(target)
    store._take_lock()  # StoreLocked while a kernel runs on this log
    try:
        replaced: Path | None = None
        if files.size(target) > 0 or files.size(files.wal) > 0:
            if not force:
                raise StoreError(
                    f"{target} already holds a log; pass --force to replace it "
                    f"(the old one is kept beside it as {target.name}.replaced-<time>)"
                )
            stamp = time.strftime("%Y%m%dT%H%M%S")
            replaced = target.with_name(f"{target.name}.replaced-{stamp}")
            for old, suffix in ((target, ""), (files.wal, "-wal"), (files.shm, "-shm")):
                if old.exists():
                    os.replace(old, replaced.with_name(replaced.name + suffix))
        tmp = target.with_name(f".{target.name}.restore.tmp")
        tmp.unlink(missing_ok=True)
        try:
            await asyncio.to_thread(_copy, source, tmp)
            events, last = await verify(tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(target.parent)
        await asyncio.to_thread(files.write_mark, last, clean=True)
        files.drop_kept_wal()
    finally:
        await store._release()
    return Copied(target, events, last, replaced)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
