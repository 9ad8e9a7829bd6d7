"""Opening a log for replay: read-only, never blocking a running kernel, never writing.

Guarantee: replay writes nothing to a log or beside it — no row, no ``-wal``/``-shm``
file next to a copy — and never holds a lock a running kernel waits for.

Mechanism (SQLite): how a file is opened depends on what lies beside it.

- ``<log>-wal`` and ``<log>-shm`` both exist: a kernel is (or was just) running. The file
  is opened with ``mode=ro``: SQLite uses the existing WAL index, sees every commit, and
  a WAL reader never blocks the writer. Each read is its own short statement, so the
  kernel's checkpoints are not held back for the length of a replay either.
- no ``-wal`` (or an empty one): a copy, or a stopped kernel's log. It is opened
  ``immutable=1``: SQLite takes no lock and creates no file. (``mode=ro`` alone would
  create ``-wal``/``-shm`` next to the copy, or fail in a read-only folder.)
- a non-empty ``-wal`` without its ``-shm`` (a copy taken with its WAL): the two files
  are copied into a private temporary folder and read there, so the original folder is
  left exactly as it was.

``--follow`` reopens the file when a kernel starts writing it (a ``-wal`` appears).
Batches are fetched on a second read-only connection, in a worker thread, while the
caller folds the batch before (SQLite releases the GIL as it steps through rows).

Sources are chosen by :func:`open_log` from the target: a path to an SQLite file, or a
``.jsonl`` slice written by ``replay export``. A PostgreSQL DSN would be a third source
class with the same methods; :func:`open_log` already refuses one with a clear line.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sqlite3
import stat
import tempfile
import threading
from collections.abc import Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from kernel.events import Meta, Recorded, registry
from kernel.store.base import Snapshot
from kernel.store.sqlite_ids import lookup_sql
from kernel.store.sqlite_streams import MARK_SQL
from replay.errors import DamagedLog, Defect, ReplayError

__all__ = ["COLUMNS", "Log", "SQLiteLog", "SliceLog", "open_log"]

COLUMNS = "position, stream, version, type, schema, data, meta, recorded_at"
SQLITE_MAGIC = b"SQLite format 3\x00"
SLICE_FORMAT = 1
#: Half a microsecond: times in ISO 8601 carry microseconds, stored times are floats.
TIME_SLACK = 5e-7


def decode_rows(rows: list[Any], defects: list[Defect]) -> list[Recorded]:
    """Records of ``rows``; a row that does not decode becomes a defect and is skipped."""
    try:
        return Recorded.from_rows(rows)
    except Exception:
        pass  # one bad row: decode them one by one to name it
    out: list[Recorded] = []
    for row in rows:
        try:
            out.extend(Recorded.from_rows([row]))
        except Exception as exc:
            kind = "upcast" if row[3] in registry.versioned else "corrupt"
            defects.append(
                Defect(kind, int(row[0]), f"{row[3]} (stream {row[1]!r}) does not decode: {exc}")
            )
    return out


class Log:
    """A log opened for reading. Subclasses implement the few primitives below."""

    #: For messages: the file (or DSN without password).
    location: str = ""
    #: A slice holds the events after this position only (0: a whole log).
    slice_after: int = 0
    #: A slice exported with filters holds only some positions (gaps are by design).
    filtered: bool = False

    def __init__(self) -> None:
        #: Rows that did not decode, found so far (a caller takes the ones its read added).
        self.defects: list[Defect] = []

    # -- primitives ------------------------------------------------------------------

    def last_position(self) -> int:
        raise NotImplementedError

    def _read(
        self,
        after: int,
        until: int | None,
        types: Collection[str] | None,
        stream: str | None,
        limit: int,
    ) -> tuple[list[Recorded], int]:
        """Up to ``limit`` rows past ``after``: (decoded records, last row position read)."""
        raise NotImplementedError

    def by_id(self, event_id: str) -> Recorded | None:
        raise NotImplementedError

    def count(self, until: int) -> int:
        """How many events have a position <= ``until``."""
        raise NotImplementedError

    def duplicate_ids(self, limit: int = 20) -> list[tuple[str, int, int]]:
        """Ids stored more than once: (id, first position, a later one), at most
        ``limit``. None here: a log whose store refuses them on insert (PostgreSQL's
        unique index) has none to find."""
        return []

    def index_defects(self, limit: int = 20) -> list[tuple[int, str]]:
        """Where the log's own indexes disagree with its events: (position, what), at
        most ``limit``. None here: a store whose indexes the database keeps."""
        return []

    def missing(self, until: int) -> list[tuple[int, int]]:
        """Gaps in positions up to ``until``: (first missing, last missing) ranges."""
        raise NotImplementedError

    def position_at(self, ts: float, *, before: bool) -> int | None:
        """The last position recorded at or before ``ts`` (or the first at/after it)."""
        raise NotImplementedError

    def snapshots(self) -> list[Snapshot]:
        """The projections' snapshots the kernel saved in this log."""
        return []

    def identity(self) -> str | None:
        """A key for caches of this log's derived state (None: do not cache)."""
        return None

    def refresh(self) -> None:
        """Make commits since opening visible (for --follow)."""

    def close(self) -> None:
        pass

    def __enter__(self) -> Log:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- derived ---------------------------------------------------------------------

    def first_position(self) -> int:
        return self.slice_after + 1

    def _note(self, defects: list[Defect]) -> None:
        self.defects.extend(defects)

    def batches(
        self,
        *,
        after: int = 0,
        until: int | None = None,
        types: Collection[str] | None = None,
        stream: str | None = None,
        batch_size: int = 20_000,
    ) -> Iterator[list[Recorded]]:
        """Events with ``after < position <= until`` in order, in lists of ``batch_size``."""
        if types is not None and not types:
            return
        while True:
            batch, last_read = self._read(after, until, types, stream, batch_size)
            if batch:
                yield batch
            if last_read <= after:
                return
            after = last_read

    def read(
        self,
        *,
        after: int = 0,
        until: int | None = None,
        types: Collection[str] | None = None,
        stream: str | None = None,
    ) -> list[Recorded]:
        return [
            r for b in self.batches(after=after, until=until, types=types, stream=stream) for r in b
        ]

    def get(self, position: int) -> Recorded | None:
        batch, _ = self._read(position - 1, position, None, None, 1)
        return batch[0] if batch and batch[0].position == position else None


# -- SQLite --------------------------------------------------------------------------------


def _check_regular_sqlite(path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ReplayError(f"{path}: no such file") from None
    except OSError as exc:
        raise ReplayError(f"{path}: cannot read it ({exc.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ReplayError(f"{path} is a directory, not an xcore event log (give the .db file)")
    if not stat.S_ISREG(st.st_mode):
        raise ReplayError(f"{path} is not a regular file, so not an xcore event log")
    try:
        with path.open("rb") as f:
            header = f.read(100)
    except OSError as exc:
        raise ReplayError(f"{path}: cannot read it ({exc.strerror})") from None
    if not header.startswith(SQLITE_MAGIC):
        raise ReplayError(f"{path} is not an xcore event log (it is not an SQLite database)")


class SQLiteLog(Log):
    """An xcore SQLite log, opened read-only (see the module docstring for how)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.path = Path(path)
        self.location = str(self.path)
        self._tmp: Path | None = None
        self._batch_conn: sqlite3.Connection | None = None
        self._batch_lock = threading.Lock()
        self._uri = ""
        self.mode = ""
        _check_regular_sqlite(self.path)
        self._conn = self._connect()
        self._stat = self._file_state()

    def _file_state(self) -> tuple[bool, int, int]:
        try:
            st = self.path.stat()
        except OSError:
            return (False, 0, 0)
        return (Path(f"{self.path}-wal").exists(), st.st_size, st.st_mtime_ns)

    def _connect(self) -> sqlite3.Connection:
        wal = Path(f"{self.path}-wal")
        shm = Path(f"{self.path}-shm")
        wal_size = wal.stat().st_size if wal.exists() else 0
        target = self.path.resolve()
        if wal.exists() and shm.exists():
            self.mode = "live"
            uri = f"{target.as_uri()}?mode=ro"
        elif wal_size > 0:
            self.mode = "private-copy"
            self._tmp = Path(tempfile.mkdtemp(prefix="xcore-replay-"))
            copy = self._tmp / "log.db"
            shutil.copyfile(self.path, copy)
            shutil.copyfile(wal, self._tmp / "log.db-wal")
            uri = f"{copy.as_uri()}?mode=ro"
        else:
            self.mode = "immutable"
            uri = f"{target.as_uri()}?immutable=1"
        self._uri = uri
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
            conn.execute("PRAGMA query_only=1")
            tables = {
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
        except sqlite3.DatabaseError as exc:
            if conn is not None:
                conn.close()
            self._drop_tmp()
            # its header was checked (_check_regular_sqlite): an SQLite file that fails
            raise DamagedLog(f"{self.path} is a damaged SQLite file: {exc}") from None
        if "events" not in tables or "xcore_meta" not in tables:
            conn.close()
            self._drop_tmp()
            hint = ""
            if not tables and not wal.exists():
                hint = " (an empty database: was it copied without its -wal file?)"
            raise ReplayError(
                f"{self.path} is an SQLite database but not an xcore event log "
                f"(no 'events' and 'xcore_meta' tables){hint}"
            )
        row = conn.execute("SELECT value FROM xcore_meta WHERE key = 'format'").fetchone()
        if row is None:
            conn.close()
            self._drop_tmp()
            raise ReplayError(f"{self.path} is not an xcore event log (no format record)")
        slice_row = conn.execute(
            "SELECT value FROM xcore_meta WHERE key = 'slice_after'"
        ).fetchone()
        self.slice_after = int(slice_row[0]) if slice_row else 0
        filtered = conn.execute(
            "SELECT value FROM xcore_meta WHERE key = 'slice_filtered'"
        ).fetchone()
        self.filtered = bool(filtered)
        return conn

    def _drop_tmp(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def close(self) -> None:
        for conn in (self._conn, self._batch_conn):
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
        self._batch_conn = None
        self._drop_tmp()

    def _batch_query(self, sql: str, params: Any) -> list[Any]:
        """A read on the connection of batch reads (used from the prefetch thread only,
        so the two threads never share a connection)."""
        with self._batch_lock:  # two batch readers alive at once take turns
            if self._batch_conn is None:
                conn = sqlite3.connect(self._uri, uri=True, check_same_thread=False)
                conn.execute("PRAGMA query_only=1")
                self._batch_conn = conn
            try:
                return self._batch_conn.execute(sql, params).fetchall()
            except sqlite3.DatabaseError as exc:
                raise DamagedLog(f"{self.path}: read failed: {exc}") from None

    def refresh(self) -> None:
        if self.mode == "live":
            return  # every statement already sees the latest commit
        state = self._file_state()
        if state != self._stat:
            self.close()
            self._conn = self._connect()
            self._stat = self._file_state()

    def _query(self, sql: str, params: Any = ()) -> list[Any]:
        try:
            return self._conn.execute(sql, params).fetchall()
        except sqlite3.DatabaseError as exc:
            raise DamagedLog(f"{self.path}: read failed: {exc}") from None

    def last_position(self) -> int:
        row = self._query("SELECT MAX(position) FROM events")
        return int(row[0][0]) if row and row[0][0] is not None else 0

    @staticmethod
    def _select(
        until: int | None, types: Collection[str] | None, stream: str | None
    ) -> tuple[str, list[Any]]:
        """The query of a read (its parameters: after, *these, limit)."""
        sql = f"SELECT {COLUMNS} FROM events WHERE position > ?"
        params: list[Any] = []
        if until is not None:
            sql += " AND position <= ?"
            params.append(until)
        if types is not None:
            sql += f" AND type IN ({','.join('?' * len(types))})"
            params.extend(types)
        if stream is not None:
            sql += " AND stream = ?"
            params.append(stream)
        return sql + " ORDER BY position LIMIT ?", params

    def _read(
        self,
        after: int,
        until: int | None,
        types: Collection[str] | None,
        stream: str | None,
        limit: int,
    ) -> tuple[list[Recorded], int]:
        sql, params = self._select(until, types, stream)
        rows = self._query(sql, [after, *params, limit])
        if not rows:
            return [], after
        defects: list[Defect] = []
        out = decode_rows(rows, defects)
        if defects:
            self._note(defects)
        return out, int(rows[-1][0])

    def batches(
        self,
        *,
        after: int = 0,
        until: int | None = None,
        types: Collection[str] | None = None,
        stream: str | None = None,
        batch_size: int = 20_000,
    ) -> Iterator[list[Recorded]]:
        """As :meth:`Log.batches`; the next batch's rows are fetched in a worker thread
        while the caller folds the current one (SQLite releases the GIL as it steps)."""
        if types is not None and not types:
            return
        sql, params = self._select(until, types, stream)
        with ThreadPoolExecutor(1, thread_name_prefix="xcore-replay-read") as pool:
            pending: Future[list[Any]] | None = pool.submit(
                self._batch_query, sql, [after, *params, batch_size]
            )
            while pending is not None:
                rows = pending.result()
                if not rows:
                    return
                last = int(rows[-1][0])
                pending = (
                    pool.submit(self._batch_query, sql, [last, *params, batch_size])
                    if len(rows) == batch_size
                    else None
                )
                defects: list[Defect] = []
                batch = decode_rows(rows, defects)
                if defects:
                    self._note(defects)
                if batch:
                    yield batch

    def by_id(self, event_id: str) -> Recorded | None:
        if self._has_id_index():  # format 3: the id index, then the unindexed end
            sql = lookup_sql(COLUMNS, 1, MARK_SQL) + " LIMIT 1"
            rows = self._query(sql, (event_id, event_id, event_id))
        else:  # an older log: its UNIQUE index on events (id)
            rows = self._query(f"SELECT {COLUMNS} FROM events WHERE id = ?", (event_id,))
        out = decode_rows(rows, [])
        return out[0] if out else None

    def _has_id_index(self) -> bool:
        rows = self._query(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'ids_index'"
        )
        return bool(rows)

    def duplicate_ids(self, limit: int = 20) -> list[tuple[str, int, int]]:
        """Ids stored more than once: (id, first position, a later one), at most
        ``limit`` (a sort of every id: read once, by ``verify``)."""
        rows = self._query(
            "SELECT id, MIN(position), MAX(position) FROM events GROUP BY id"
            " HAVING COUNT(*) > 1 ORDER BY MIN(position) LIMIT ?",
            (limit,),
        )
        return [(str(i), int(a), int(b)) for i, a, b in rows]

    def index_defects(self, limit: int = 20) -> list[tuple[int, str]]:
        # the lagged indexes of kernel/store/sqlite_streams.py and sqlite_ids.py: each
        # row names an event that exists and matches, and each event up to the mark
        # has its rows (an id stored twice is reported by duplicate_ids instead)
        tables = {r[0] for r in self._query("SELECT name FROM sqlite_master WHERE type = 'table'")}
        mark = f"COALESCE({MARK_SQL}, 0)"
        checks: list[tuple[str, str]] = []
        if "streams_index" in tables:
            checks += [
                (
                    "SELECT s.position, 'the stream index names ' || quote(s.stream) || ' version '"
                    " || s.version || ', the event there is another' FROM streams_index s"
                    " LEFT JOIN events e ON e.position = s.position WHERE e.position IS NULL"
                    " OR e.stream IS NOT s.stream OR e.version IS NOT s.version",
                    "",
                ),
                (
                    "SELECT e.position, 'not in the stream index, though before its mark'"
                    f" FROM events e WHERE e.position <= {mark} AND NOT EXISTS (SELECT 1"
                    " FROM streams_index s WHERE s.stream = e.stream AND s.version = e.version)",
                    "",
                ),
                (
                    # the mark lowered by another program: reads by stream would return
                    # the events between it and these rows twice
                    "SELECT s.position, 'in the stream index, though after its mark'"
                    f" FROM streams_index s WHERE s.position > {mark}",
                    "",
                ),
            ]
        if "ids_index" in tables:
            checks += [
                (
                    "SELECT i.position, 'the id index names id ' || quote(i.id) || ', the event"
                    " there has another' FROM ids_index i LEFT JOIN events e"
                    " ON e.position = i.position WHERE e.id IS NOT i.id",
                    "",
                ),
                (
                    "SELECT e.position, 'its id is not in the id index, though before its mark'"
                    f" FROM events e WHERE e.position <= {mark} AND NOT EXISTS"
                    " (SELECT 1 FROM ids_index i WHERE i.id = e.id)",
                    "",
                ),
            ]
        found: list[tuple[int, str]] = []
        for sql, _ in checks:
            rows = self._query(f"{sql} LIMIT ?", (limit,))
            found.extend((int(p), str(what)) for p, what in rows)
        return sorted(found)[:limit]

    def count(self, until: int) -> int:
        # COUNT(*) of the whole table walks its smallest index; a range on the position
        # walks the table itself, so count the shorter side.
        total = int(self._query("SELECT COUNT(*) FROM events")[0][0])
        last = self.last_position()
        if until >= last:
            return total
        if last - until < until:
            tail = self._query("SELECT COUNT(*) FROM events WHERE position > ?", (until,))
            return total - int(tail[0][0])
        return int(self._query("SELECT COUNT(*) FROM events WHERE position <= ?", (until,))[0][0])

    def missing(self, until: int) -> list[tuple[int, int]]:
        rows = self._query(
            "SELECT e.position, (SELECT MAX(p.position) FROM events p WHERE p.position < e.position)"
            " FROM events e WHERE e.position <= ? AND e.position > ? AND NOT EXISTS"
            " (SELECT 1 FROM events q WHERE q.position = e.position - 1)",
            (until, self.first_position()),
        )
        gaps = [(int(prev or self.slice_after) + 1, int(pos) - 1) for pos, prev in rows]
        first = self._query("SELECT MIN(position) FROM events")[0][0]
        if first is not None and int(first) > self.first_position() and int(first) <= until:
            gaps.insert(0, (self.first_position(), int(first) - 1))
        return sorted(set(gaps))

    def position_at(self, ts: float, *, before: bool) -> int | None:
        # times are given to the microsecond (ISO 8601): match within half of one
        if before:
            row = self._query(
                "SELECT MAX(position) FROM events WHERE recorded_at <= ?", (ts + TIME_SLACK,)
            )
        else:
            row = self._query(
                "SELECT MIN(position) FROM events WHERE recorded_at >= ?", (ts - TIME_SLACK,)
            )
        return int(row[0][0]) if row and row[0][0] is not None else None

    def snapshots(self) -> list[Snapshot]:
        try:
            rows = self._conn.execute(
                "SELECT name, position, schema, state FROM snapshots ORDER BY name"
            ).fetchall()
        except sqlite3.DatabaseError:
            return []
        return [Snapshot(str(n), int(p), int(s), bytes(st)) for n, p, s, st in rows]

    def identity(self) -> str | None:
        rows = self._query(
            "SELECT id FROM events WHERE position = (SELECT MIN(position) FROM events)"
        )
        if not rows or self.slice_after:
            return None
        return hashlib.sha256(f"sqlite:{rows[0][0]}".encode()).hexdigest()[:24]

    def event_id(self, position: int) -> str | None:
        rows = self._query("SELECT id FROM events WHERE position = ?", (position,))
        return str(rows[0][0]) if rows else None


# -- JSONL slices ----------------------------------------------------------------------------


def _record_from_dict(d: dict[str, Any], defects: list[Defect], line: int) -> Recorded | None:
    try:
        m = d["meta"]
        meta = Meta(
            id=m["id"],
            correlation_id=m.get("correlation_id"),
            causation_id=m.get("causation_id"),
            actor=m.get("actor"),
            node=m.get("node"),
            boot=m.get("boot"),
        )
        from datetime import datetime

        ts = datetime.fromisoformat(d["recorded_at"]).timestamp()
        data = d["data"]
        if d["type"] in registry.versioned:
            data = registry.upcast(d["type"], int(d["schema"]), data)
        return Recorded(
            int(d["position"]),
            str(d["stream"]),
            int(d["version"]),
            str(d["type"]),
            int(d["schema"]),
            data,
            meta,
            ts,
        )
    except Exception as exc:
        pos = d.get("position") if isinstance(d, dict) else None
        defects.append(
            Defect("corrupt", pos if isinstance(pos, int) else None, f"line {line}: {exc!r}")
        )
        return None


class SliceLog(Log):
    """A slice exported by ``replay export`` (JSON lines), held in memory."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.path = Path(path)
        self.location = str(self.path)
        self.header: dict[str, Any] = {}
        self.events: list[Recorded] = []
        self._ids: dict[str, Recorded] = {}
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses it.
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            raise ReplayError(f"{self.path}: cannot read it ({exc.strerror})") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ReplayError(f"{self.path} is not a regular file, so not an xcore slice")
            os.set_blocking(fd, True)
            with os.fdopen(fd, "rb", closefd=False) as f:
                raw = f.read()
        except OSError as exc:
            raise ReplayError(f"{self.path}: cannot read it ({exc.strerror})") from None
        finally:
            os.close(fd)
        defects: list[Defect] = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                d = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                if i == 1:
                    raise ReplayError(
                        f"{self.path} is not an xcore log or slice (line 1 is not JSON: {exc})"
                    ) from None
                defects.append(Defect("corrupt", None, f"line {i} is not JSON: {exc}"))
                continue
            if i == 1:
                if not isinstance(d, dict) or "xcore_slice" not in d:
                    raise ReplayError(
                        f"{self.path} is not an xcore slice (its first line has no 'xcore_slice' header)"
                    )
                try:
                    fmt = int(d["xcore_slice"])
                    self.slice_after = int(d.get("after") or 0)
                except (TypeError, ValueError):
                    raise ReplayError(
                        f"{self.path}: its header is damaged (xcore_slice {d.get('xcore_slice')!r}, "
                        f"after {d.get('after')!r})"
                    ) from None
                if fmt > SLICE_FORMAT:
                    raise ReplayError(
                        f"{self.path} was written by a newer xcore (slice format {fmt})"
                    )
                self.header = d
                self.filtered = bool(d.get("filtered"))
                continue
            r = _record_from_dict(d, defects, i) if isinstance(d, dict) else None
            if r is None:
                if not isinstance(d, dict):
                    defects.append(Defect("corrupt", None, f"line {i} is not an event object"))
                continue
            if self.events and r.position <= self.events[-1].position:
                defects.append(
                    Defect("corrupt", r.position, f"line {i}: position out of order, skipped")
                )
                continue
            self.events.append(r)
            self._ids[r.meta.id] = r
        if not self.header:
            raise ReplayError(f"{self.path} is empty: not an xcore slice")
        self._note(defects)
        self._positions = [r.position for r in self.events]

    def last_position(self) -> int:
        return self.events[-1].position if self.events else self.slice_after

    def _index(self, after: int) -> int:
        import bisect

        return bisect.bisect_right(self._positions, after)

    def _read(
        self,
        after: int,
        until: int | None,
        types: Collection[str] | None,
        stream: str | None,
        limit: int,
    ) -> tuple[list[Recorded], int]:
        out: list[Recorded] = []
        last = after
        for r in self.events[self._index(after) :]:
            if until is not None and r.position > until:
                break
            last = r.position
            if types is not None and r.type not in types:
                continue
            if stream is not None and r.stream != stream:
                continue
            out.append(r)
            if len(out) >= limit:
                break
        return out, last

    def by_id(self, event_id: str) -> Recorded | None:
        return self._ids.get(event_id)

    def count(self, until: int) -> int:
        return self._index(until)

    def missing(self, until: int) -> list[tuple[int, int]]:
        gaps = []
        prev = self.slice_after
        for p in self._positions:
            if p > until:
                break
            if p != prev + 1:
                gaps.append((prev + 1, p - 1))
            prev = p
        return gaps

    def position_at(self, ts: float, *, before: bool) -> int | None:
        if before:
            found = [r.position for r in self.events if r.timestamp <= ts + TIME_SLACK]
            return max(found) if found else None
        found = [r.position for r in self.events if r.timestamp >= ts - TIME_SLACK]
        return min(found) if found else None


def open_log(target: str | os.PathLike[str]) -> Log:
    """Open ``target`` for replay: an SQLite log file or a ``.jsonl`` slice.

    Raises :class:`ReplayError` (one line) when it is neither.
    """
    text = os.fspath(target)
    if "://" in text:
        scheme = text.split("://", 1)[0]
        if scheme.startswith("postgres"):
            raise ReplayError(
                "replay reads SQLite logs and .jsonl slices; a PostgreSQL log is not supported "
                "yet (export a slice from it, or copy it to SQLite)"
            )
        raise ReplayError(f"{text}: not a path to an xcore log (unknown scheme {scheme!r})")
    path = Path(text)
    if path.suffix in (".jsonl", ".ndjson"):
        if path.is_dir() or (path.exists() and not path.is_file()):
            raise ReplayError(f"{path} is not a regular file, so not an xcore slice")
        return SliceLog(path)
    return SQLiteLog(path)
