"""The embedded default store: one SQLite file in WAL mode, written through aiosqlite.

Writes go through a single writer task that **group-commits** (``sqlite_writer.py``):
every append waiting when the writer becomes free joins one transaction, so 100
concurrent producers cost one fsync per batch, not one each. ``append`` returns only
after that transaction commits (``synchronous=FULL`` by default: durable across power
loss).

Only one process may write a log: the store takes an exclusive ``flock`` on
``<file>.lock`` and a second opener gets :class:`~kernel.errors.StoreLocked`. Readers
(the replay tool) can open a copy with ``readonly=True``, which takes no lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, Final, Literal

import aiosqlite

from kernel.errors import StoreClosed, StoreCorrupt, StoreError, StoreLocked
from kernel.events import NewEvent, Recorded
from kernel.store.base import ANY, Snapshot
from kernel.store.sqlite_writer import COLUMNS, GroupCommitWriter
from kernel.store.tail import Tail

__all__ = ["SQLiteStore", "Synchronous"]

log = logging.getLogger("xcore.store")

Synchronous = Literal["FULL", "NORMAL", "EXTRA"]

#: Layout version of the tables below, kept in ``xcore_meta``.
FORMAT: Final = 1
SQLITE_MAGIC: Final = b"SQLite format 3\x00"

SCHEMA = """
CREATE TABLE IF NOT EXISTS xcore_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    position    INTEGER PRIMARY KEY,
    stream      TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    type        TEXT    NOT NULL,
    schema      INTEGER NOT NULL,
    data        BLOB    NOT NULL,
    meta        BLOB    NOT NULL,
    id          TEXT    NOT NULL,
    recorded_at REAL    NOT NULL,
    UNIQUE (stream, version)
);
CREATE UNIQUE INDEX IF NOT EXISTS events_id ON events (id);
CREATE TRIGGER IF NOT EXISTS events_append_only_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'the xcore event log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS events_append_only_delete BEFORE DELETE ON events
BEGIN SELECT RAISE(ABORT, 'the xcore event log is append-only'); END;
CREATE TABLE IF NOT EXISTS checkpoints (name TEXT PRIMARY KEY, position INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS snapshots (
    name TEXT PRIMARY KEY, position INTEGER NOT NULL, schema INTEGER NOT NULL,
    state BLOB NOT NULL
);
"""

UPSERT_CHECKPOINT = (
    "INSERT INTO checkpoints (name, position) VALUES (?, ?)"
    " ON CONFLICT (name) DO UPDATE SET position = excluded.position"
)
UPSERT_SNAPSHOT = (
    "INSERT INTO snapshots (name, position, schema, state) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (name) DO UPDATE SET position = excluded.position,"
    " schema = excluded.schema, state = excluded.state"
)


def check_file(path: Path) -> None:
    """Refuse, with a clear message, a file that is not an intact SQLite database."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if size == 0:
        return
    with path.open("rb") as f:
        header = f.read(100)
    if len(header) < 100 or not header.startswith(SQLITE_MAGIC):
        raise StoreCorrupt(
            f"{path} is not an xcore event log: it is not an SQLite database "
            f"(no SQLite header in its first bytes)"
        )
    page_size = int.from_bytes(header[16:18], "big")
    if page_size == 1:
        page_size = 65536
    pages = int.from_bytes(header[28:32], "big")
    change = int.from_bytes(header[24:28], "big")
    valid_for = int.from_bytes(header[92:96], "big")
    if pages and change == valid_for and pages * page_size > size:
        raise StoreCorrupt(
            f"{path} is truncated: its header announces {pages * page_size} bytes "
            f"but the file holds {size}; restore it from a copy"
        )


class SQLiteStore:
    """An event log in one SQLite file (WAL mode)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Synchronous = "FULL",
        readonly: bool = False,
        max_batch: int = 10_000,
        tail_size: int = 8192,
        max_page_count: int | None = None,
    ) -> None:
        if synchronous not in ("FULL", "NORMAL", "EXTRA"):
            raise StoreError(f"synchronous must be FULL, NORMAL or EXTRA, not {synchronous!r}")
        self.path = Path(path)
        self.location = str(self.path)
        self.synchronous = synchronous
        self.readonly = readonly
        self.max_batch = max_batch
        self._max_page_count = max_page_count
        self._tail = Tail(tail_size)
        self._write_conn: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._writer: GroupCommitWriter | None = None
        self._lock_fd: int | None = None
        self._last = 0
        self._open = False

    # -- opening and closing -------------------------------------------------------

    async def open(self) -> None:
        if self._open:
            return
        if self.readonly:
            if not self.path.exists():
                raise StoreError(f"{self.path}: no such event log")
            check_file(self.path)
            self._reader = await self._connect(readonly=True)
            await self._check_schema(self._reader)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._take_lock()
            try:
                check_file(self.path)
                self._write_conn = await self._connect(readonly=False)
                await self._create_schema(self._write_conn)
                self._reader = await self._connect(readonly=True)
            except BaseException:
                await self._release()
                raise
        assert self._reader is not None
        self._last = await self._query_last_position(self._reader)
        self._tail.reset(self._last)
        self._tail.closed = False
        self._open = True
        if self._write_conn is not None:
            self._writer = GroupCommitWriter(
                self.path, self._write_conn, self._tail, self._last, self.max_batch
            )
            self._writer.start()

    async def _connect(self, *, readonly: bool) -> aiosqlite.Connection:
        target = f"file:{self.path}?mode=ro" if readonly else str(self.path)
        try:
            conn = await aiosqlite.connect(
                target,
                uri=readonly,
                # The writer lets sqlite3 open each transaction implicitly (BEGIN IMMEDIATE
                # before the first INSERT): a batch is then two trips to the connection's
                # thread, executemany + commit, instead of four.
                isolation_level=None if readonly else "IMMEDIATE",
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open the event log: {exc}") from exc
        try:
            if not readonly:
                mode = await (await conn.execute("PRAGMA journal_mode=WAL")).fetchone()
                if mode is None or str(mode[0]).lower() != "wal":
                    raise StoreError(f"{self.path}: could not switch the log to WAL mode")
                await conn.execute(f"PRAGMA synchronous={self.synchronous}")
                if self._max_page_count is not None:
                    await conn.execute(f"PRAGMA max_page_count={int(self._max_page_count)}")
            else:
                await conn.execute("PRAGMA query_only=1")
            await conn.execute("PRAGMA busy_timeout=5000")
        except sqlite3.DatabaseError as exc:
            await conn.close()
            raise StoreCorrupt(f"{self.path} is not a readable event log: {exc}") from exc
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _create_schema(self, conn: aiosqlite.Connection) -> None:
        try:
            tables = {
                row[0]
                for row in await conn.execute_fetchall(
                    "SELECT name FROM sqlite_master WHERE type = 'table'"
                )
            }
            if tables and "events" not in tables:
                raise StoreCorrupt(
                    f"{self.path} is an SQLite database but not an xcore event log "
                    f"(it has the tables {', '.join(sorted(tables))} and no 'events')"
                )
            await conn.executescript(SCHEMA)
            await conn.execute(
                "INSERT OR IGNORE INTO xcore_meta (key, value) VALUES ('format', ?)",
                (str(FORMAT),),
            )
            await conn.commit()
        except sqlite3.DatabaseError as exc:
            raise StoreCorrupt(f"{self.path} is not a readable event log: {exc}") from exc
        await self._check_schema(conn)

    async def _check_schema(self, conn: aiosqlite.Connection) -> None:
        try:
            rows = list(
                await conn.execute_fetchall("SELECT value FROM xcore_meta WHERE key = 'format'")
            )
        except sqlite3.DatabaseError as exc:
            raise StoreCorrupt(
                f"{self.path} is not an xcore event log or is damaged: {exc}"
            ) from exc
        if not rows:
            raise StoreCorrupt(f"{self.path} is not an xcore event log (no format record)")
        found = int(rows[0][0])
        if found > FORMAT:
            raise StoreError(
                f"{self.path} was written by a newer xcore (log format {found}; "
                f"this version reads format {FORMAT})"
            )

    async def _query_last_position(self, conn: aiosqlite.Connection) -> int:
        try:
            row = await (await conn.execute("SELECT MAX(position) FROM events")).fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreCorrupt(f"{self.path} is damaged: {exc}") from exc
        return int(row[0]) if row and row[0] is not None else 0

    def _take_lock(self) -> None:
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise StoreLocked(
                f"{self.path} is already open for writing (held by pid {holder}); "
                f"only one kernel may write a log — open a copy read-only to inspect it"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    async def close(self) -> None:
        if not self._open:
            return
        if self._writer is not None:
            await self._writer.stop()
            self._writer = None
        self._open = False
        self._tail.close()
        await self._release()

    async def _release(self) -> None:
        for conn in (self._write_conn, self._reader):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
        self._write_conn = self._reader = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _check_open(self) -> None:
        if not self._open:
            raise StoreClosed(f"{self.path}: the event log is closed")

    def _writable(self) -> GroupCommitWriter:
        self._check_open()
        if self.readonly or self._writer is None:
            raise StoreError(f"{self.path} was opened read-only")
        return self._writer

    # -- writing -------------------------------------------------------------------

    async def append(
        self,
        events: Sequence[NewEvent],
        *,
        stream: str,
        expected_version: int | None = ANY,
    ) -> list[Recorded]:
        writer = self._writable()
        if not events:
            return []
        return await writer.append(events, stream, expected_version)

    # -- reading -------------------------------------------------------------------

    async def read(
        self,
        *,
        after: int = 0,
        types: Collection[str] | None = None,
        stream: str | None = None,
        limit: int | None = None,
    ) -> list[Recorded]:
        self._check_open()
        if types is not None and not isinstance(types, (set, frozenset)):
            types = frozenset(types)
        if not self.readonly:
            cached = self._tail.read(after, types, stream, limit)
            if cached is not None:
                return cached
        sql = f"SELECT {COLUMNS} FROM events WHERE position > ?"
        params: list[Any] = [after]
        if types is not None:
            if not types:
                return []
            sql += f" AND type IN ({','.join('?' * len(types))})"
            params.extend(types)
        if stream is not None:
            sql += " AND stream = ?"
            params.append(stream)
        sql += " ORDER BY position"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        assert self._reader is not None
        try:
            rows = await self._reader.execute_fetchall(sql, params)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: read failed: {exc}") from exc
        return Recorded.from_rows(rows)

    async def last_position(self) -> int:
        self._check_open()
        if self._writer is not None:
            return self._writer.last
        assert self._reader is not None
        self._last = await self._query_last_position(self._reader)
        return self._last

    async def stream_version(self, stream: str) -> int:
        self._check_open()
        if self._writer is not None and stream in self._writer.versions:
            return self._writer.versions[stream]
        assert self._reader is not None
        row = await (
            await self._reader.execute(
                "SELECT MAX(version) FROM events WHERE stream = ?", (stream,)
            )
        ).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    async def wait(self, after: int, timeout: float | None = None) -> int:
        self._check_open()
        return await self._tail.wait(after, timeout)

    # -- checkpoints and snapshots ---------------------------------------------------

    async def load_checkpoint(self, name: str) -> int | None:
        self._check_open()
        assert self._reader is not None
        row = await (
            await self._reader.execute("SELECT position FROM checkpoints WHERE name = ?", (name,))
        ).fetchone()
        return int(row[0]) if row else None

    async def save_checkpoint(self, name: str, position: int) -> None:
        await self._writable().put(UPSERT_CHECKPOINT, (name, position))

    async def load_snapshot(self, name: str) -> Snapshot | None:
        self._check_open()
        assert self._reader is not None
        row = await (
            await self._reader.execute(
                "SELECT position, schema, state FROM snapshots WHERE name = ?", (name,)
            )
        ).fetchone()
        if row is None:
            return None
        return Snapshot(name=name, position=int(row[0]), schema=int(row[1]), state=bytes(row[2]))

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        await self._writable().put(
            UPSERT_SNAPSHOT, (snapshot.name, snapshot.position, snapshot.schema, snapshot.state)
        )
