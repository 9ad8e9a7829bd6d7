"""Replay's own snapshots: projection states at many positions, kept outside the log.

Guarantee: a cached state is used only if it is the state a fresh fold would give —
same log, same projection code — and the cache never touches the log: it lives in the
user's cache folder (``$XCORE_REPLAY_CACHE``, else ``$XDG_CACHE_HOME/xcore/replay``,
else ``~/.cache/xcore/replay``), one SQLite file per log.

Mechanism: the kernel keeps one snapshot per projection (the latest); ``bisect`` needs
states at many positions, so replay saves its own while it folds (every ``every``
positions). Each entry is keyed by the projection's name, schema and a fingerprint of
the source files of its class hierarchy (edit the projection and its old entries are
ignored), and records the id of the event at its position: before use, that id is
checked against the log, so a different log that happens to share the cache key is
never mistaken for this one. States are pickled (they hold dataclasses, deques...);
the folder is created private (0700) and refused if another user could write it.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import pickle
import sqlite3
import stat
import sys
from pathlib import Path
from typing import Any

from kernel.projections import Projection
from replay.source import Log, SQLiteLog

__all__ = ["SnapshotCache", "default_dir", "fingerprint"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS snaps (
    key TEXT NOT NULL, position INTEGER NOT NULL, event_id TEXT, state BLOB NOT NULL,
    PRIMARY KEY (key, position)
);
"""


def default_dir() -> Path:
    env = os.environ.get("XCORE_REPLAY_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "xcore" / "replay"


def fingerprint(cls: type[Projection]) -> str:
    """Name, schema and the source of every class of ``cls``'s hierarchy, hashed."""
    h = hashlib.sha256(f"{cls.name}|{cls.schema}|{sys.version_info[:2]}".encode())
    for klass in cls.__mro__:
        if klass is object:
            continue
        try:
            source = inspect.getsourcefile(klass)
        except TypeError:
            source = None
        if source is None:
            h.update(f"{klass.__module__}.{klass.__qualname__}".encode())
            continue
        with contextlib.suppress(OSError):
            h.update(Path(source).read_bytes())
    return f"{cls.name}:{h.hexdigest()[:20]}"


class SnapshotCache:
    """Cached projection states of one log. Disabled (``enabled`` False) when unusable."""

    def __init__(self, log: Log, directory: Path | None = None) -> None:
        self.log = log
        self.enabled = False
        self.problem: str | None = None
        self._conn: sqlite3.Connection | None = None
        self._keys: dict[type[Projection], str] = {}
        identity = log.identity()
        if identity is None or not isinstance(log, SQLiteLog):
            self.problem = "this log cannot be cached (a slice)"
            return
        folder = directory if directory is not None else default_dir()
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            st = folder.stat()
            if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                self.problem = f"{folder} is writable by others; not using it"
                return
            conn = sqlite3.connect(folder / f"{identity}.sqlite", timeout=5)
            conn.execute("PRAGMA synchronous=OFF")
            conn.executescript(SCHEMA)
            conn.commit()
        except (OSError, sqlite3.Error) as exc:
            self.problem = f"cache folder {folder} unusable: {exc}"
            return
        self._conn = conn
        self.enabled = True

    def key(self, cls: type[Projection]) -> str:
        k = self._keys.get(cls)
        if k is None:
            k = self._keys[cls] = fingerprint(cls)
        return k

    def positions(self, cls: type[Projection], until: int | None = None) -> list[int]:
        if self._conn is None:
            return []
        sql = "SELECT position FROM snaps WHERE key = ?"
        params: list[Any] = [self.key(cls)]
        if until is not None:
            sql += " AND position <= ?"
            params.append(until)
        try:
            return [int(r[0]) for r in self._conn.execute(sql + " ORDER BY position", params)]
        except sqlite3.Error:
            return []

    def load(self, cls: type[Projection], position: int) -> Projection | None:
        """The state of ``cls`` at ``position``, if cached and still valid for this log."""
        if self._conn is None:
            return None
        try:
            row = self._conn.execute(
                "SELECT event_id, state FROM snaps WHERE key = ? AND position = ?",
                (self.key(cls), position),
            ).fetchone()
        except sqlite3.Error:
            return None
        if row is None:
            return None
        assert isinstance(self.log, SQLiteLog)
        if row[0] is not None and self.log.event_id(position) != row[0]:
            return None
        try:
            state = pickle.loads(row[1])
            obj = cls.__new__(cls)
            obj.__dict__.update(state)
        except Exception:
            return None
        obj.position = position
        return obj

    def save(self, projection: Projection, position: int) -> None:
        if self._conn is None:
            return
        assert isinstance(self.log, SQLiteLog)
        try:
            blob = pickle.dumps(vars(projection), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            return  # a state that cannot be pickled is simply not cached
        try:
            self._conn.execute(
                "INSERT OR REPLACE INTO snaps (key, position, event_id, state) VALUES (?, ?, ?, ?)",
                (self.key(type(projection)), position, self.log.event_id(position), blob),
            )
        except sqlite3.Error:
            return

    def commit(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.commit()

    def close(self) -> None:
        if self._conn is not None:
            self.commit()
            self._conn.close()
            self._conn = None
