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

import asyncio
import contextlib
import fcntl
import logging
import math
import os
import sqlite3
import stat
import time
import urllib.parse
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any, Final, Literal

import aiosqlite

from kernel.errors import StoreClosed, StoreCorrupt, StoreError, StoreLocked
from kernel.events import LeanRows, NewEvent, Recorded, registry
from kernel.store.base import (
    ANY,
    Snapshot,
    StreamWrite,
    WriteResult,
    check_limit,
    check_types,
    check_write,
)
from kernel.store.sqlite_files import FILE_MODE, LogFiles
from kernel.store.sqlite_ids import bound_sql, ceiling
from kernel.store.sqlite_streams import (
    INDEX_EVERY,
    INDEXED_UPTO,
    MARK_SQL,
    VERSIONS_CHUNK,
    read_stream_sql,
    stream_version_sql,
    stream_versions_sql,
    true_mark,
    unindexed_sql,
)
from kernel.store.sqlite_trusted import skip_triggers
from kernel.store.sqlite_writer import _ONE_TRIP, COLUMNS, INLINE_HOLD, GroupCommitWriter
from kernel.store.tail import Tail
from kernel.store.versions import VersionReads

__all__ = ["SQLiteStore", "Synchronous"]

log = logging.getLogger("xcore.store")

Synchronous = Literal["FULL", "NORMAL", "EXTRA"]

#: Layout version of the tables below, kept in ``xcore_meta``. Format 1 had
#: ``UNIQUE (stream, version)`` on ``events``; format 2 has the lagged stream index
#: (``kernel/store/sqlite_streams.py``) and format 3 the lagged id index instead of a
#: ``UNIQUE`` index on ``events (id)`` (``kernel/store/sqlite_ids.py``). An older log is
#: upgraded when opened for writing, and read as it is when opened read-only.
FORMAT: Final = 3
SQLITE_MAGIC: Final = b"SQLite format 3\x00"

_EVENTS_TABLE = """
CREATE TABLE IF NOT EXISTS {name} (
    position    INTEGER PRIMARY KEY,
    stream      TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    type        TEXT    NOT NULL,
    schema      INTEGER NOT NULL,
    data        BLOB    NOT NULL,
    meta        BLOB    NOT NULL,
    id          TEXT    NOT NULL,
    recorded_at REAL    NOT NULL
);
"""

#: The insert guard of format 2, replaced at the upgrade to 3 (its id probe needs the
#: ``events_id`` index that format 3 drops).
_INSERT_GUARD = "events_append_only_insert"

_APPEND_ONLY = f"""
CREATE TABLE IF NOT EXISTS streams_index (
    stream   TEXT    NOT NULL,
    version  INTEGER NOT NULL,
    position INTEGER NOT NULL,
    PRIMARY KEY (stream, version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ids_index (
    id       TEXT    NOT NULL PRIMARY KEY,
    position INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS events_append_only_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'the xcore event log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS events_append_only_delete BEFORE DELETE ON events
BEGIN SELECT RAISE(ABORT, 'the xcore event log is append-only'); END;
-- INSERT OR REPLACE deletes the row it conflicts with without firing delete triggers.
-- The position is the table's only key (no UNIQUE index on it), so an insert past the
-- end of the log replaces nothing: one seek (MAX(position)) refuses every other one.
-- An id or a stream version already indexed is refused too (one probe of each index;
-- the writer never reuses one, so only an outside writer can try; one in the unindexed
-- end is reported by `xcore replay verify`).
CREATE TRIGGER IF NOT EXISTS {_INSERT_GUARD} BEFORE INSERT ON events
WHEN NEW.position <= (SELECT MAX(position) FROM events)
  OR EXISTS (SELECT 1 FROM ids_index WHERE id = NEW.id)
  OR EXISTS (SELECT 1 FROM streams_index WHERE stream = NEW.stream AND version = NEW.version)
BEGIN SELECT RAISE(ABORT, 'the xcore event log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS streams_index_append_only_update BEFORE UPDATE ON streams_index
BEGIN SELECT RAISE(ABORT, 'the xcore stream index is append-only'); END;
CREATE TRIGGER IF NOT EXISTS streams_index_append_only_delete BEFORE DELETE ON streams_index
BEGIN SELECT RAISE(ABORT, 'the xcore stream index is append-only'); END;
CREATE TRIGGER IF NOT EXISTS ids_index_append_only_update BEFORE UPDATE ON ids_index
BEGIN SELECT RAISE(ABORT, 'the xcore id index is append-only'); END;
CREATE TRIGGER IF NOT EXISTS ids_index_append_only_delete BEFORE DELETE ON ids_index
BEGIN SELECT RAISE(ABORT, 'the xcore id index is append-only'); END;
-- an INSERT OR REPLACE of an indexed id would delete its row without the delete
-- trigger: an insert of an id already indexed is skipped (as INSERT OR IGNORE)
CREATE TRIGGER IF NOT EXISTS ids_index_no_replace BEFORE INSERT ON ids_index
WHEN EXISTS (SELECT 1 FROM ids_index WHERE id = NEW.id)
BEGIN SELECT RAISE(IGNORE); END;
"""

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS xcore_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
    + _EVENTS_TABLE.format(name="events")
    + _APPEND_ONLY
    + """
CREATE TABLE IF NOT EXISTS checkpoints (name TEXT PRIMARY KEY, position INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS snapshots (
    name TEXT PRIMARY KEY, position INTEGER NOT NULL, schema INTEGER NOT NULL,
    state BLOB NOT NULL
);
"""
)

#: Both indexes made whole and the mark moved to the end of the log (statements to run
#: inside a transaction: the upgrades below, an imported slice; not for a log of
#: format 3 with a long history: every id is read).
INDEX_WHOLE_LOG: Final = (
    "INSERT OR IGNORE INTO streams_index (stream, version, position)"
    " SELECT stream, version, position FROM events"
    f" WHERE position > COALESCE({MARK_SQL}, 0) ORDER BY stream, version",
    # every id: a format-2 log has its ids in the events_id index that this replaces
    "INSERT OR IGNORE INTO ids_index (id, position)"
    " SELECT id, position FROM events ORDER BY id, position",
    "INSERT INTO xcore_meta (key, value)"
    f" VALUES ('{INDEXED_UPTO}', (SELECT COALESCE(MAX(position), 0) FROM events))"
    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
)
_INDEX_ALL = ";\n".join(INDEX_WHOLE_LOG) + ";\n"
_FORMAT_DONE = f"UPDATE xcore_meta SET value = '{FORMAT}' WHERE key = 'format';\nCOMMIT;\n"

#: Format 1 to 3: the events table without its UNIQUE (stream, version) nor its id
#: index (a table constraint cannot be dropped: the table is copied), and both indexes
#: built sorted.
UPGRADE_FROM_1 = (
    "BEGIN IMMEDIATE;"
    + _EVENTS_TABLE.format(name="events_format3")
    + """
INSERT INTO events_format3 SELECT position, stream, version, type, schema, data, meta, id,
    recorded_at FROM events ORDER BY position;
DROP TABLE events;
ALTER TABLE events_format3 RENAME TO events;
"""
    + _APPEND_ONLY
    + _INDEX_ALL
    + _FORMAT_DONE
)

#: Format 2 to 3: the id index replaces ``events_id`` (read in its order before it is
#: dropped: no sort); the insert guard that probed it is replaced; the stream index is
#: completed up to the end of the log, the id index's mark.
UPGRADE_FROM_2 = (
    f"BEGIN IMMEDIATE; DROP TRIGGER IF EXISTS {_INSERT_GUARD};"
    + _APPEND_ONLY
    + _INDEX_ALL
    + "DROP INDEX IF EXISTS events_id;\n"
    + _FORMAT_DONE
)

UPSERT_CHECKPOINT = (
    "INSERT INTO checkpoints (name, position) VALUES (?, ?)"
    " ON CONFLICT (name) DO UPDATE SET position = excluded.position"
)
UPSERT_SNAPSHOT = (
    "INSERT INTO snapshots (name, position, schema, state) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (name) DO UPDATE SET position = excluded.position,"
    " schema = excluded.schema, state = excluded.state"
)


def _uri(path: Path) -> str:
    """``path`` as an SQLite ``file:`` URI (any file name: ``?``, ``#``, ``%``...)."""
    return "file:" + urllib.parse.quote(str(path.absolute()))


def check_file(path: Path) -> None:
    """Refuse, with a clear message, a file that is not an intact SQLite database."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise StoreCorrupt(f"{path} is not an xcore event log: it is not a regular file")
    size = st.st_size
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
        # A checkpoint copies the WAL's pages in ascending order, page 1 (this header,
        # with the new size) first, and grows the file as it reaches the pages past its
        # end: one in progress (another process's, for a read-only open of a live log)
        # or killed meanwhile (SIGKILL) leaves the header ahead of the file, the missing
        # pages still in the WAL, which SQLite reads them from and the next checkpoint
        # copies. SQLite's own bound: the file plus the WAL plus the pending-byte page.
        wal = path.with_name(path.name + "-wal")
        try:
            wal_size = wal.stat().st_size
        except OSError:
            wal_size = 0
        if pages * page_size <= size + wal_size + 65536:
            return
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
        tail_bytes: int = 16 * 1024 * 1024,
        max_page_count: int | None = None,
        allow_new_log: bool = False,
        accept_log_loss: bool = False,
        evidence: Iterable[Path] = (),
        mark_interval: float = 1.0,
        poll_interval: float = 0.1,
        index_every: int = INDEX_EVERY,
        inline_limit: float = 0.005,
        inline_hold: float = INLINE_HOLD,
    ) -> None:
        if synchronous not in ("FULL", "NORMAL", "EXTRA"):
            raise StoreError(f"synchronous must be FULL, NORMAL or EXTRA, not {synchronous!r}")
        # absolute: every file of the log (the lock, the mark, the connections opened
        # later, as the writer's checkpoint connection) stays this one if the process
        # changes its working directory after the open (a plugin's os.chdir)
        self.path = Path(os.path.abspath(path))
        self.location = str(self.path)
        self.synchronous = synchronous
        self.readonly = readonly
        self.max_batch = max_batch
        self.allow_new_log = allow_new_log
        self.accept_log_loss = accept_log_loss
        self.mark_interval = mark_interval
        self.poll_interval = poll_interval
        if index_every < 1:
            raise StoreError(f"index_every must be at least 1, not {index_every}")
        self.index_every = index_every
        if not math.isfinite(inline_limit) or inline_limit < 0:
            raise StoreError(f"inline_limit must be 0 or more seconds, not {inline_limit!r}")
        #: a lone append with nothing else ready commits in the event loop's thread
        #: while commits take less than this (seconds; 0: always the connection's thread)
        self.inline_limit = inline_limit
        if not math.isfinite(inline_hold) or inline_hold < 0:
            raise StoreError(f"inline_hold must be 0 or more seconds, not {inline_hold!r}")
        #: a task appending in a loop, each append committed in the task itself, yields
        #: to the event loop once it has held it this long (seconds; 0: after each append)
        self.inline_hold = inline_hold
        #: the log's format (see FORMAT); known once open
        self.format = FORMAT
        self.files = LogFiles(self.path, evidence)
        #: what the last open recovered after an unclean stop (None after a clean one)
        self.recovery: dict[str, Any] | None = None
        self._max_page_count = max_page_count
        self._tail = Tail(tail_size, tail_bytes)
        self._write_conn: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._reader_stamp: tuple[Any, ...] | None = None
        self._writer: GroupCommitWriter | None = None
        self._marker: asyncio.Task[None] | None = None
        self._lock_fd: int | None = None
        self._last = 0
        self._open = False
        #: stream_version calls waiting for the next query, and the task running them
        self._version_reads = VersionReads(
            self._versions,
            refused=(StoreError,),
            refusal=lambda stream, e: e,
            closed=lambda: StoreClosed(f"{self.path}: the event log is closed"),
            name="xcore-sqlite-versions",
            newer=self._writer_version,
        )
        #: whether the writer's own inserts go through the append-only triggers (True
        #: only where this interpreter cannot turn them off; see sqlite_trusted.py)
        self.writer_checked_by_triggers = True

    # -- opening and closing -------------------------------------------------------

    async def open(self) -> None:
        if self._open:
            return
        try:
            if self.readonly:
                await self._open_readonly()
            else:
                await self._open_writable()
        except OSError as exc:  # the folder or a file cannot be created, read or copied
            await self._release()
            raise StoreError(f"{self.path}: cannot open the event log: {exc}") from exc
        except BaseException:
            await self._release()
            raise
        self._tail.reset(self._last)
        self._tail.closed = False
        self._open = True
        if self._write_conn is not None:
            try:
                end = list(await self._write_conn.execute_fetchall(unindexed_sql()))
                top = ceiling(time.time_ns())
                bound = list(await self._write_conn.execute_fetchall(bound_sql(), (top,)))
            except BaseException:
                self._open = False
                await self._release()
                raise
            self._writer = GroupCommitWriter(
                self.path,
                self._write_conn,
                self._tail,
                self._last,
                self.max_batch,
                unindexed=[(str(r[0]), int(r[1]), int(r[2])) for r in end],
                # reversed: of an id an outside writer stored twice, the first counts
                unindexed_ids={str(r[3]): int(r[2]) for r in reversed(end)},
                ids_bound=str(bound[0][0]) if bound and bound[0][0] is not None else "",
                ids_ceiling=top,
                index_every=self.index_every,
                inline_limit=self.inline_limit,
                inline_hold=self.inline_hold,
            )
            self._writer.start()
            self._marker = asyncio.create_task(self._mark_loop(), name="xcore-store-mark")

    async def _open_readonly(self) -> None:
        if not self.path.exists():
            raise StoreError(f"{self.path}: no such event log")
        check_file(self.path)
        await self._open_reader()

    async def _open_reader(self) -> None:
        # With no -wal beside it the log is not being written: read the file as it is
        # (immutable), so a read-only look leaves no -wal/-shm behind.
        immutable = self.files.size(self.files.wal) < 0
        reader = await self._connect(readonly=True, immutable=immutable)
        try:
            await self._check_schema(reader)
            self._last = await self._query_last_position(reader)
        except BaseException:
            await self._close_conn(reader, "reader")
            raise
        self._reader = reader
        self._reader_stamp = self._file_stamp() if immutable else None

    def _file_stamp(self) -> tuple[Any, ...]:
        st = self.path.stat()
        return (st.st_mtime_ns, st.st_size, self.files.wal.exists())

    async def _open_writable(self) -> None:
        files = self.files
        files.make_folder()
        self._take_lock()
        mark = files.read_mark()
        files.check_not_lost(mark, allow_new_log=self.allow_new_log)
        if files.size(self.path) <= 0:  # a new log (on purpose, if the folder was used)
            mark = None
            if files.size(files.wal) >= 0:  # a stale -wal of a lost log: keep it aside
                files.keep_wal()
                for stale in (files.wal, files.shm):
                    stale.unlink(missing_ok=True)
            files.create_log()
        check_file(self.path)
        unclean = files.unclean(mark)
        kept = files.keep_wal() if unclean else None
        in_file = await asyncio.to_thread(self._last_in_main_file) if unclean else None
        self._write_conn = await self._connect(readonly=False)
        await self._create_schema(self._write_conn)
        self.writer_checked_by_triggers = not await self._skip_triggers(self._write_conn)
        self._reader = await self._connect(readonly=True)
        self._last = await self._query_last_position(self._reader)
        if mark is not None and self._last < mark.position:
            message = (
                f"{self.path} ends at position {self._last} but position {mark.position} "
                f"was acknowledged (mark of {time.ctime(mark.at)}): "
                f"{mark.position - self._last} acknowledged events are lost"
                + (f"; the write-ahead log as found is kept in {kept}" if kept else "")
                + ". Restore the log from a backup (xcore restore); set accept_log_loss "
                "(XCORE_ACCEPT_LOG_LOSS=1) only to go on without them"
            )
            if not self.accept_log_loss:
                raise StoreCorrupt(message)
            log.error("%s — going on as accept_log_loss is set", message)
        if unclean:
            recovered = self._last - (in_file or 0)
            self.recovery = {
                "last_position": self._last,
                "in_main_file": in_file,
                "recovered_from_wal": recovered,
                "acknowledged_mark": mark.position if mark else None,
                "wal_copy": str(kept) if kept else None,
            }
            log.warning(
                "%s was not closed cleanly: %d events recovered from its write-ahead log "
                "(log ends at %d, the last mark was %s); the WAL as found is kept in %s "
                "until the next clean stop",
                self.path,
                recovered,
                self._last,
                mark.position if mark else "absent",
                kept or "(none: there was no WAL)",
            )
        await self._check_index_mark(self._write_conn)
        await asyncio.to_thread(files.write_mark, self._last, clean=False)

    async def _check_index_mark(self, conn: aiosqlite.Connection) -> None:
        """Put back the indexes' mark an outside writer moved (see ``true_mark``): the
        writer reloads the events after it and indexes them at its next flush."""
        stored, true = await conn._execute(true_mark, conn._conn)  # type: ignore[no-untyped-call]
        if true is None:
            return
        log.error(
            "%s: the indexes' mark (%s in xcore_meta) says position %d, but the indexes "
            "hold the events up to position %d: another program changed it; it is put "
            "back (only xcore should write an event log)",
            self.path,
            INDEXED_UPTO,
            stored,
            true,
        )
        await conn.execute(
            "INSERT INTO xcore_meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (INDEXED_UPTO, str(true)),
        )
        await conn.commit()

    async def _skip_triggers(self, conn: aiosqlite.Connection) -> bool:
        """Run the writer's connection without the append-only triggers (see
        ``sqlite_trusted.py``); False when they stay on."""
        if not _ONE_TRIP:  # pragma: no cover - an aiosqlite without its private runner
            return False
        done: bool = await conn._execute(skip_triggers, conn._conn, str(self.path))  # type: ignore[no-untyped-call]
        return done

    def _last_in_main_file(self) -> int:
        """The last position held by the main file alone (the WAL not applied)."""
        conn = sqlite3.connect(f"{_uri(self.path)}?immutable=1", uri=True)
        try:
            row = conn.execute("SELECT MAX(position) FROM events").fetchone()
        except sqlite3.DatabaseError:
            return 0  # a new log: the table is not in the main file yet
        finally:
            conn.close()
        return int(row[0]) if row and row[0] is not None else 0

    async def _connect(self, *, readonly: bool, immutable: bool = False) -> aiosqlite.Connection:
        if readonly:
            target = f"{_uri(self.path)}?{'immutable=1' if immutable else 'mode=ro'}"
        else:
            target = str(self.path)
        pending = aiosqlite.connect(
            target,
            uri=readonly,
            # The writer lets sqlite3 open each transaction implicitly (BEGIN IMMEDIATE
            # before the first INSERT): a batch is then two trips to the connection's
            # thread, executemany + commit, instead of four.
            isolation_level=None if readonly else "IMMEDIATE",
            check_same_thread=False,
        )
        # aiosqlite's thread is not a daemon: a connection some error path left open
        # would keep the process alive after its work ended (a hang at exit). SQLite
        # is crash-safe, so an exit that drops an open connection loses nothing.
        thread = getattr(pending, "_thread", None)
        if thread is not None and not thread.is_alive():
            thread.daemon = True
        try:
            conn = await pending
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open the event log: {exc}") from exc
        try:
            if not readonly:
                mode = await (await conn.execute("PRAGMA journal_mode=WAL")).fetchone()
                if mode is None or str(mode[0]).lower() != "wal":
                    raise StoreError(f"{self.path}: could not switch the log to WAL mode")
                await conn.execute(f"PRAGMA synchronous={self.synchronous}")
                # the writer checkpoints itself, off the event loop (sqlite_writer.py)
                await conn.execute("PRAGMA wal_autocheckpoint=0")
                if self._max_page_count is not None:
                    await conn.execute(f"PRAGMA max_page_count={int(self._max_page_count)}")
            else:
                await conn.execute("PRAGMA query_only=1")
            await conn.execute("PRAGMA busy_timeout=5000")
        except sqlite3.DatabaseError as exc:
            await self._close_conn(conn, "connection")
            raise StoreCorrupt(f"{self.path} is not a readable event log: {exc}") from exc
        except BaseException:
            await self._close_conn(conn, "connection")
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
            found = await self._read_format(conn) if "events" in tables else None
            if found in (1, 2):
                await self._upgrade(conn, found)
                # the copy went to the WAL; the writer checkpoints only as it appends
                await conn.execute_fetchall("PRAGMA wal_checkpoint(PASSIVE)")
            await conn.executescript(SCHEMA)
            await conn.execute(
                "INSERT OR IGNORE INTO xcore_meta (key, value) VALUES ('format', ?)",
                (str(FORMAT),),
            )
            await conn.commit()
        except sqlite3.DatabaseError as exc:
            if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                # not damage: the log is as it was (an upgrade is one transaction)
                raise StoreError(
                    f"{self.path}: cannot open the event log, the disk is full ({exc}); "
                    "the log is unchanged — free some space (an upgrade from format 1 "
                    "copies the events once: about the log's size) and open it again"
                ) from exc
            raise StoreCorrupt(f"{self.path} is not a readable event log: {exc}") from exc
        await self._check_schema(conn)

    async def _read_format(self, conn: aiosqlite.Connection) -> int | None:
        try:
            rows = list(
                await conn.execute_fetchall("SELECT value FROM xcore_meta WHERE key = 'format'")
            )
        except sqlite3.OperationalError:
            return None  # no xcore_meta table: _check_schema names the problem
        return int(rows[0][0]) if rows else None

    async def _upgrade(self, conn: aiosqlite.Connection, found: int) -> None:
        """Upgrade a format-1 or format-2 log to FORMAT, in one transaction."""
        started = time.monotonic()
        count = await self._query_last_position(conn)
        log.warning(
            "%s: upgrading the log from format %d to %d (%s; %d events)",
            self.path,
            found,
            FORMAT,
            "stream and id indexes, events copied once" if found == 1 else "id index",
            count,
        )
        await conn.commit()
        try:
            await conn.executescript(UPGRADE_FROM_1 if found == 1 else UPGRADE_FROM_2)
        except sqlite3.Error:
            with contextlib.suppress(sqlite3.Error):
                await conn.execute("ROLLBACK")
            raise
        log.warning(
            "%s: upgraded to format %d in %.1f s", self.path, FORMAT, time.monotonic() - started
        )

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
        #: the log's format: a format-1 log opened read-only is read as it is
        self.format = found

    async def _query_last_position(self, conn: aiosqlite.Connection) -> int:
        try:  # one trip, no cursor left open (see _query)
            rows = list(await conn.execute_fetchall("SELECT MAX(position) FROM events"))
        except (sqlite3.ProgrammingError, ValueError) as exc:
            if not self._open:  # close() won the race
                raise StoreClosed(f"{self.path}: the event log is closed") from exc
            raise StoreError(f"{self.path}: read failed: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            raise StoreCorrupt(f"{self.path} is damaged: {exc}") from exc
        return int(rows[0][0]) if rows and rows[0][0] is not None else 0

    def _take_lock(self) -> None:
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, FILE_MODE)
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
        """Commit what is queued, checkpoint the WAL into the file, then release it all.

        After a clean close the log file is self-contained (no ``-wal`` needed): copying
        ``events.db`` alone copies the whole log.
        """
        if not self._open:
            return
        if self._writer is not None:
            self._writer.refuse_new()  # from now on appends get StoreClosed
        if self._marker is not None:
            self._marker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._marker
            self._marker = None
        if self._writer is not None:
            await self._writer.stop()
        self._open = False
        await self._version_reads.close()
        self._tail.close()
        clean = self._write_conn is not None and await self._checkpoint()
        last = self._writer.last if self._writer is not None else self._last
        self._writer = None
        await self._release()
        if clean:
            try:
                await asyncio.to_thread(self.files.write_mark, last, clean=True)
                self.files.drop_kept_wal()
            except OSError as exc:
                log.error("could not record the clean stop of %s: %s", self.path, exc)

    async def _checkpoint(self) -> bool:
        """Move the whole WAL into the log file; True when nothing is left behind."""
        assert self._write_conn is not None
        if self._reader is not None:  # our own reader must not hold the WAL open
            await self._close_conn(self._reader, "reader")
            self._reader = None
        try:
            row = await (
                await self._write_conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            ).fetchone()
        except sqlite3.Error as exc:
            log.error("could not checkpoint %s at close: %s", self.path, exc)
            return False
        if row is None or row[0]:
            log.warning(
                "could not checkpoint all of %s at close (another process reads it); "
                "its -wal still holds part of the log",
                self.path,
            )
            return False
        return True

    async def _close_conn(self, conn: aiosqlite.Connection, what: str) -> None:
        try:
            await conn.close()
        except Exception as exc:
            log.error("closing the %s of %s failed: %r", what, self.path, exc)

    async def _release(self) -> None:
        if self._marker is not None:
            self._marker.cancel()
            self._marker = None
        for conn, what in ((self._reader, "reader"), (self._write_conn, "write connection")):
            if conn is not None:
                await self._close_conn(conn, what)
        self._write_conn = self._reader = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def _mark_loop(self) -> None:
        """Record the acknowledged position about every ``mark_interval`` seconds."""
        marked = self._last
        failing = False
        while True:
            await asyncio.sleep(self.mark_interval)
            writer = self._writer
            if writer is None or writer.last == marked:
                continue
            position = writer.last
            try:
                await asyncio.to_thread(self.files.write_mark, position, clean=False)
            except OSError as exc:
                if not failing:
                    log.error("could not write the mark of %s: %s", self.path, exc)
                failing = True
                continue
            failing = False
            marked = position

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Whether appends succeed: False, with the reason, while the last batch failed."""
        details: dict[str, Any] = {"location": self.location}
        if not self._open:
            return False, {**details, "error": "the event log is closed"}
        if self._writer is None:
            return True, {**details, "readonly": True}
        details["last_position"] = self._writer.last
        if not self._writer.running:
            return False, {**details, "error": "the log's writer has stopped"}
        if self._writer.failure is not None:
            return False, {**details, "error": f"appends fail: {self._writer.failure}"}
        return True, details

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
        writer = self._writer
        if writer is None or not self._open:
            writer = self._writable()  # raises, naming why
        if not (  # the common one-event append, checked inline (the hot path)
            type(events) is list
            and len(events) == 1
            and type(events[0]) is NewEvent
            and type(stream) is str
            and (expected_version is None or type(expected_version) is int)
        ):
            events = check_write(self.location, stream, events, expected_version)
            if not events:
                return []
        # writer.append, inline: one coroutine less per append
        answer = writer.offer(events, stream, expected_version)
        if isinstance(answer, list):
            if writer.turn_due():
                await writer.turn()
            return answer
        return await answer

    async def append_many(self, writes: Sequence[StreamWrite]) -> list[WriteResult]:
        writer = self._writer
        if writer is None or not self._open:
            writer = self._writable()  # raises, naming why
        return await writer.append_many(writes)

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
        check_limit(limit)
        types = check_types(types)
        if not self.readonly:
            cached = self._tail.read(after, types, stream, limit)
            if cached is not None:
                return cached
        if types is not None and not types:
            return []
        await self._refresh_reader()
        params: list[Any]
        if stream is not None and self.format >= 2:
            sql, params = read_stream_sql(
                COLUMNS, after=after, stream=stream, types=types, limit=limit
            )
        else:
            sql = f"SELECT {COLUMNS} FROM events WHERE position > ?"
            params = [after]
            if types is not None:
                sql += f" AND type IN ({','.join('?' * len(types))})"
                params.extend(types)
            if stream is not None:  # a format-1 log: its UNIQUE (stream, version) index
                sql += " AND stream = ?"
                params.append(stream)
            sql += " ORDER BY position"
            if limit is not None:
                sql += " LIMIT ?"
                params.append(limit)
        return Recorded.from_rows(await self._query(sql, params))

    async def read_lean(
        self,
        *,
        after: int = 0,
        types: Collection[str] | None = None,
        limit: int | None = None,
    ) -> list[Recorded]:
        """As :meth:`read` (no stream filter), for a fold: only ``position, type, data``
        are fetched (and ``schema`` when a type that needs upcasting may be read); a
        record's stream, version, metadata and time are fetched for its whole batch on
        first access (:class:`~kernel.events.LeanRecorded`)."""
        got = await self.read_lean_rows(after=after, types=types, limit=limit)
        return got if isinstance(got, list) else got.records()

    async def read_lean_rows(
        self,
        *,
        after: int = 0,
        types: Collection[str] | None = None,
        limit: int | None = None,
        until: int | None = None,
    ) -> LeanRows | list[Recorded]:
        """The rows :meth:`read_lean` makes records of, left as rows (a fold builds each
        record as it applies it, :class:`~kernel.events.LeanRows`), up to position
        ``until`` if given; the records themselves when the in-memory tail holds them
        (``until`` is then not applied: the caller filters)."""
        self._check_open()
        check_limit(limit)
        types = check_types(types)
        if until is not None and not isinstance(until, (int, float)):
            # SQLite would compare text with the positions as it orders mixed values
            # (every number before any text): refuse, as Python's comparison did
            raise StoreError(f"a read's until must be a position (a number), not {until!r}")
        if not self.readonly:
            cached = self._tail.read(after, types, None, limit)
            if cached is not None:
                return cached
        if types is not None and not types:
            return []
        await self._refresh_reader()
        # the schema matters only to upcast: without a type past schema 1 among those
        # read, it joins the columns a record loads when asked
        versioned = registry.versioned
        lean = not versioned or (types is not None and versioned.isdisjoint(types))
        columns = "position, type, data" if lean else "position, type, schema, data"
        sql = f"SELECT {columns} FROM events WHERE position > ?"
        params: list[Any] = [after]
        if until is not None:
            sql += " AND position <= ?"
            params.append(until)
        if types is not None:
            sql += f" AND type IN ({','.join('?' * len(types))})"
            params.extend(types)
        sql += " ORDER BY position"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return LeanRows(await self._query(sql, params), self._load_columns)

    def _load_columns(self, first: int, last: int) -> list[Any]:
        """The columns a lean batch lacks, for positions ``first`` to ``last``: one short
        read-only connection of its own (the batch may be read after the store closed;
        the rows it names never change)."""
        immutable = self.files.size(self.files.wal) < 0
        conn = sqlite3.connect(
            f"{_uri(self.path)}?{'immutable=1' if immutable else 'mode=ro'}", uri=True
        )
        try:
            return conn.execute(
                "SELECT position, stream, version, meta, recorded_at, schema FROM events"
                " WHERE position BETWEEN ? AND ?",
                (first, last),
            ).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: read failed: {exc}") from exc
        finally:
            conn.close()

    async def _query(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """One read in one trip to the reader's thread (no cursor left open: an open
        statement would keep the reader's snapshot, so close could not checkpoint)."""
        reader = self._reader
        if reader is None or not self._open:
            raise StoreClosed(f"{self.path}: the event log is closed")
        try:
            return list(await reader.execute_fetchall(sql, params))
        except (sqlite3.ProgrammingError, ValueError) as exc:
            if not self._open or self._reader is not reader:  # close() won the race
                raise StoreClosed(f"{self.path}: the event log is closed") from exc
            raise StoreError(f"{self.path}: read failed: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: read failed: {exc}") from exc

    async def last_position(self) -> int:
        self._check_open()
        if self._writer is not None:
            return self._writer.last
        await self._refresh_reader()
        assert self._reader is not None
        self._last = await self._query_last_position(self._reader)
        return self._last

    async def _refresh_reader(self) -> None:
        """A read-only store opened an idle log as it was (immutable); once the file
        changes (a writer opened it), read it through SQLite's locks instead."""
        try:
            if self._reader_stamp is None or self._file_stamp() == self._reader_stamp:
                return
        except OSError as exc:
            raise StoreError(f"{self.path}: the event log went away: {exc}") from exc
        # the new reader replaces the old one before it closes: a read running meanwhile
        # finds a reader either way
        old, stamp = self._reader, self._reader_stamp
        self._reader_stamp = None
        try:
            await self._open_reader()
        except BaseException:
            self._reader_stamp = stamp  # the old reader stays; the next read tries again
            raise
        if old is not None:
            await self._close_conn(old, "reader")

    async def stream_version(self, stream: str) -> int:
        """The stream's current version, read after the call began.

        Concurrent calls for streams the writer has not touched yet share one query (a
        burst of claims — a scheduler's first round after boot — reads its streams in
        one trip to the reader's thread, not one each); a call waits for the next query
        to start, never for an answer read before it was made.
        """
        self._check_open()
        if self._writer is not None and stream in self._writer.versions:
            return self._writer.versions[stream]
        return await self._version_reads.get(stream)

    def _writer_version(self, stream: str) -> int | None:
        """The writer's own count of ``stream`` (never behind the file), if it has one."""
        writer = self._writer
        return writer.versions.get(stream) if writer is not None else None

    async def _versions(self, streams: list[str]) -> dict[str, int]:
        await self._refresh_reader()
        found: dict[str, int] = {}
        for i in range(0, len(streams), VERSIONS_CHUNK):
            chunk = streams[i : i + VERSIONS_CHUNK]
            if len(chunk) == 1 and self.format >= 2:
                sql, params = stream_version_sql(chunk[0])
                rows = await self._query(sql, params)
                if rows and rows[0][0] is not None:
                    found[chunk[0]] = int(rows[0][0])
                continue
            sql, params = stream_versions_sql(chunk, indexed=self.format >= 2)
            for stream, version in await self._query(sql, params):
                if version is not None:
                    found[str(stream)] = int(version)
        return found

    async def wait(self, after: int, timeout: float | None = None) -> int:
        self._check_open()
        if not self.readonly:
            return await self._tail.wait(after, timeout)
        # A read-only store sees other processes' commits only by looking: poll.
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            last = await self.last_position()
            if last > after:
                return last
            pause = self.poll_interval
            if deadline is not None:
                pause = min(pause, deadline - time.monotonic())
                if pause <= 0:
                    return last
            await asyncio.sleep(pause)
            if not self._open:
                return self._last

    # -- checkpoints and snapshots ---------------------------------------------------

    async def load_checkpoint(self, name: str) -> int | None:
        self._check_open()
        await self._refresh_reader()
        rows = await self._query("SELECT position FROM checkpoints WHERE name = ?", (name,))
        return int(rows[0][0]) if rows else None

    async def save_checkpoint(self, name: str, position: int) -> None:
        await self._writable().put(UPSERT_CHECKPOINT, (name, position))

    async def load_snapshot(self, name: str) -> Snapshot | None:
        self._check_open()
        await self._refresh_reader()
        rows = await self._query(
            "SELECT position, schema, state FROM snapshots WHERE name = ?", (name,)
        )
        if not rows:
            return None
        row = rows[0]
        return Snapshot(name=name, position=int(row[0]), schema=int(row[1]), state=bytes(row[2]))

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        await self._writable().put(
            UPSERT_SNAPSHOT, (snapshot.name, snapshot.position, snapshot.schema, snapshot.state)
        )
