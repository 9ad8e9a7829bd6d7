"""The bounded log store: every structured log line, kept beside the event log.

Guarantee: the store holds at most ``max_lines`` lines, none older than ``max_age``;
when a bound is passed the *oldest* lines are dropped first and the number dropped is
counted (persisted, so it survives a restart). A flood of lines never blocks the code
that logs nor grows memory without bound: lines wait in a bounded in-memory buffer
(past it they are dropped and counted too) until the writer stores them in batches.

Mechanism: a SQLite file (``<data_dir>/logs.db``, or an in-memory database when the
event log is in memory) with one table of lines whose ids only grow. Lines are only
ever removed from the old end, so the stored ids are one contiguous range: the count
is ``newest - oldest + 1`` without a scan, and an id is a stable pagination cursor.
Sinks run in the logging writer thread (:func:`kernel.logging.add_sink`); the store's
writer is a worker thread driven from the monitor's task group; queries run in a
worker thread too, so the event loop never touches the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import orjson

from kernel.logging import LogLine
from services.monitor.settings import LogSettings

__all__ = ["LEVELS", "LogQuery", "LogStore"]

log = logging.getLogger("xcore.monitor.logs")

LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS lines (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    levelno INTEGER NOT NULL,
    level TEXT NOT NULL,
    logger TEXT NOT NULL,
    plugin TEXT,
    task TEXT,
    run_id TEXT,
    request_id TEXT,
    message TEXT NOT NULL,
    extra TEXT,
    exc TEXT
);
CREATE INDEX IF NOT EXISTS lines_ts ON lines(ts);
CREATE INDEX IF NOT EXISTS lines_plugin ON lines(plugin, id);
CREATE INDEX IF NOT EXISTS lines_task ON lines(task, id);
CREATE INDEX IF NOT EXISTS lines_run ON lines(run_id);
CREATE INDEX IF NOT EXISTS lines_request ON lines(request_id);
CREATE INDEX IF NOT EXISTS lines_level ON lines(levelno, id);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value BLOB NOT NULL);
"""

_COLUMNS = "id, ts, level, logger, plugin, task, run_id, request_id, message, extra, exc"
#: the monitor's own store lines are not captured (a failing store would feed itself)
_OWN_LOGGER = log.name


@dataclass(frozen=True, slots=True)
class LogQuery:
    """Filters of a log query; every field is optional."""

    plugin: str | None = None
    task: str | None = None
    run_id: str | None = None
    request_id: str | None = None
    logger: str | None = None
    #: minimum level name
    level: str | None = None
    since: float | None = None
    until: float | None = None
    #: case-insensitive substring of the message
    q: str | None = None

    def where(self) -> tuple[list[str], list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        for column in ("plugin", "task", "run_id", "request_id"):
            value = getattr(self, column)
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if self.logger is not None:
            clauses.append("(logger = ? OR substr(logger, 1, ?) = ?)")
            params += [self.logger, len(self.logger) + 1, self.logger + "."]
        if self.level is not None:
            clauses.append("levelno >= ?")
            params.append(LEVELS[self.level])
        if self.since is not None:
            clauses.append("ts >= ?")
            params.append(self.since)
        if self.until is not None:
            clauses.append("ts < ?")
            params.append(self.until)
        if self.q:
            clauses.append("instr(lower(message), ?) > 0")
            params.append(self.q.lower())
        return clauses, params

    def matches(self, line: LogLine) -> bool:
        """The same filter applied to a line in memory."""
        for column in ("plugin", "task", "run_id", "request_id"):
            value = getattr(self, column)
            if value is not None and line.get(column) != value:
                return False
        if self.logger is not None:
            name = line["logger"]
            if name != self.logger and not name.startswith(self.logger + "."):
                return False
        if self.level is not None and LEVELS.get(line["level"], 0) < LEVELS[self.level]:
            return False
        if self.since is not None and line["ts"] < self.since:
            return False
        if self.until is not None and line["ts"] >= self.until:
            return False
        return not (self.q and self.q.lower() not in line["message"].lower())


class LogStore:
    """Bounded storage of log lines; see the module docstring."""

    def __init__(self, path: Path | None, settings: LogSettings) -> None:
        self.path = path
        self.settings = settings
        self._min_level = LEVELS[settings.level]
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._pending: deque[LogLine] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self._lost_in_buffer = 0
        self.dropped = 0
        self.first_id = 0
        self.last_id = 0
        self.failing: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self._last_age_prune = 0.0
        self._limiter = anyio.CapacityLimiter(1)

    # -- life cycle --------------------------------------------------------------------

    def open(self) -> None:
        if self.path is None:
            conn = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            with contextlib.suppress(OSError):
                self.path.chmod(0o600)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
        self._conn = conn
        row = conn.execute("SELECT value FROM state WHERE key = 'dropped'").fetchone()
        self.dropped = int(orjson.loads(row[0])) if row else 0
        self._refresh_range()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wake streams waiting on ``loop`` when lines are stored (call on that loop)."""
        self._loop = loop
        self._changed = asyncio.Event()

    def close(self) -> None:
        self._stopping = True
        self._wake.set()
        with self._lock:
            if self._conn is not None:
                while self._pending:
                    self._write_batch(self._take())
                self._conn.close()
                self._conn = None

    def _refresh_range(self) -> None:
        assert self._conn is not None
        first, last = self._conn.execute("SELECT min(id), max(id) FROM lines").fetchone()
        if last is None:
            seq = self._conn.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'lines'"
            ).fetchone()
            self.last_id = int(seq[0]) if seq else 0
            self.first_id = self.last_id + 1
        else:
            self.first_id, self.last_id = int(first), int(last)

    @property
    def count(self) -> int:
        return max(0, self.last_id - self.first_id + 1)

    # -- capture (logging writer thread) -----------------------------------------------

    def sink(self, line: LogLine) -> None:
        """Buffer one line for the writer (never blocks; a full buffer drops the oldest)."""
        if line["levelno"] < self._min_level or line["logger"] == _OWN_LOGGER:
            return
        cap = self.settings.max_message
        if len(line["message"]) > cap or len(line.get("exc") or "") > cap:
            # cut before buffering (the buffer is bounded in lines); a copy: other sinks
            # receive the same dict
            line = {
                **line,
                "message": _cut(line["message"], cap),
                "exc": _cut(line["exc"], cap) if line.get("exc") else None,
            }
        pending = self._pending
        pending.append(line)
        if len(pending) > self.settings.buffer:
            with contextlib.suppress(IndexError):
                pending.popleft()
                self._lost_in_buffer += 1
        self._wake.set()

    def _take(self, limit: int = 5000) -> list[LogLine]:
        out: list[LogLine] = []
        pending = self._pending
        while pending and len(out) < limit:
            try:
                out.append(pending.popleft())
            except IndexError:
                break
        return out

    # -- the writer --------------------------------------------------------------------

    async def run(self) -> None:
        """Store buffered lines until cancelled (run it in the service's task group)."""
        try:
            while True:
                await anyio.to_thread.run_sync(self._write_pending, limiter=self._limiter)
                await anyio.lowlevel.checkpoint()
        finally:
            self._wake.set()

    def _write_pending(self) -> None:
        """Wait (briefly) for lines, then store one batch (worker thread)."""
        if not self._pending:
            self._wake.wait(0.25)
        self._wake.clear()
        with self._lock:
            if self._conn is None:
                return
            batch = self._take()
            if batch or self._lost_in_buffer:
                self._write_batch(batch)
        if batch and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
                self._loop.call_soon_threadsafe(self._pulse)

    def _write_batch(self, batch: Sequence[LogLine]) -> None:
        conn = self._conn
        assert conn is not None
        rows = [
            (
                line["ts"],
                line["levelno"],
                line["level"],
                line["logger"],
                line.get("plugin"),
                line.get("task"),
                line.get("run_id"),
                line.get("request_id"),
                line["message"],  # (cut by ``sink`` already)
                orjson.dumps(line["extra"], default=str).decode() if line.get("extra") else None,
                line.get("exc"),
            )
            for line in batch
        ]
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if rows:
                    conn.executemany(
                        "INSERT INTO lines (ts, levelno, level, logger, plugin, task, run_id,"
                        " request_id, message, extra, exc) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                        rows,
                    )
                dropped = self._prune(conn)
                lost, self._lost_in_buffer = self._lost_in_buffer, 0
                if dropped or lost:
                    self.dropped += dropped + lost
                    conn.execute(
                        "INSERT OR REPLACE INTO state (key, value) VALUES ('dropped', ?)",
                        (orjson.dumps(self.dropped),),
                    )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            # The lines of this batch are lost (counted); say it once per episode.
            self.dropped += len(rows)
            if self.failing is None:
                log.error("the log store %s cannot store lines: %s", self.path or "(memory)", exc)
            self.failing = f"{type(exc).__name__}: {exc}"
            return
        if self.failing is not None:
            log.warning("the log store %s stores lines again", self.path or "(memory)")
            self.failing = None
        self._refresh_range()

    def _prune(self, conn: sqlite3.Connection) -> int:
        dropped = 0
        first, last = conn.execute("SELECT min(id), max(id) FROM lines").fetchone()
        if last is None:
            return 0
        excess = (last - first + 1) - self.settings.max_lines
        if excess > 0:
            conn.execute("DELETE FROM lines WHERE id < ?", (first + excess,))
            dropped += excess
            first += excess
        now = time.time()
        if now - self._last_age_prune >= 1.0:
            self._last_age_prune = now
            cutoff = now - self.settings.max_age
            row = conn.execute(
                "SELECT max(id) FROM lines WHERE ts < ? AND id >= ?", (cutoff, first)
            ).fetchone()
            if row[0] is not None:
                # everything up to the newest expired line: the old end only, so the
                # stored ids stay one contiguous range
                dropped += conn.execute("DELETE FROM lines WHERE id <= ?", (row[0],)).rowcount
        return dropped

    def _pulse(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        if changed is not None:
            changed.set()

    async def wait_for_lines(self, timeout: float) -> None:
        """Return when new lines were stored, or after ``timeout`` seconds."""
        changed = self._changed
        if changed is None:
            await anyio.sleep(timeout)
            return
        with anyio.move_on_after(timeout):
            await changed.wait()

    # -- queries -----------------------------------------------------------------------

    async def query(
        self,
        query: LogQuery,
        *,
        limit: int = 100,
        before: int | None = None,
        after: int | None = None,
    ) -> tuple[list[dict[str, Any]], bool]:
        """Lines matching ``query``: newest first below ``before``, or oldest first above
        ``after``; returns (lines, more)."""
        return await anyio.to_thread.run_sync(self._query, query, limit, before, after)

    def _query(
        self, query: LogQuery, limit: int, before: int | None, after: int | None
    ) -> tuple[list[dict[str, Any]], bool]:
        clauses, params = query.where()
        if after is not None:
            clauses.append("id > ?")
            params.append(after)
            order = "ASC"
        else:
            order = "DESC"
            if before is not None:
                clauses.append("id < ?")
                params.append(before)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"SELECT {_COLUMNS} FROM lines {where} ORDER BY id {order} LIMIT ?"
        with self._lock:
            if self._conn is None:
                return [], False
            rows = self._conn.execute(sql, [*params, limit + 1]).fetchall()
        more = len(rows) > limit
        return [_row(r) for r in rows[:limit]], more

    # -- small persisted state (the monitor's in-process counters) ---------------------

    def save_state(self, key: str, value: Any) -> None:
        with self._lock:
            if self._conn is None:
                return
            self._conn.execute(
                "INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)",
                (key, orjson.dumps(value)),
            )

    def load_state(self, key: str) -> Any:
        with self._lock:
            if self._conn is None:
                return None
            row = self._conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return None if row is None else orjson.loads(row[0])

    def describe(self) -> dict[str, Any]:
        return {
            "stored": self.count,
            "oldest_id": self.first_id if self.count else None,
            "newest_id": self.last_id if self.count else None,
            "dropped": self.dropped + self._lost_in_buffer,
            "buffered": len(self._pending),
            "max_lines": self.settings.max_lines,
            "max_age_s": self.settings.max_age,
            "failing": self.failing,
        }


def _cut(text: str, cap: int) -> str:
    return text if len(text) <= cap else text[:cap] + f"... [{len(text) - cap} more characters]"


def _row(r: Sequence[Any]) -> dict[str, Any]:
    return {
        "id": r[0],
        "ts": r[1],
        "time": _iso(r[1]),
        "level": r[2],
        "logger": r[3],
        "plugin": r[4],
        "task": r[5],
        "run_id": r[6],
        "request_id": r[7],
        "message": r[8],
        "extra": orjson.loads(r[9]) if r[9] else {},
        "exc": r[10],
    }


def _iso(ts: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
