"""The group-commit writer of the SQLite store.

One task owns the write connection. Every append (and checkpoint or snapshot write)
waiting when it becomes free joins one transaction, committed in one trip to the
connection's thread; each caller's future resolves only once that transaction is
durable. The writer is the only one to assign positions and versions, so it keeps them
in memory (the last position, each stream's version) and checks ``expected_version``
and idempotency keys itself, batch by batch.

A lone append meets an idle writer most of the time when one producer writes: it then
commits in the loop's own thread, and, for one event to a stream the writer knows, in
its caller's task (``_lone``): no queue, no wake-up, no turn of the writer task, one
INSERT in autocommit mode (its own durable transaction). A lone commit blocks the loop,
so it is done only while nothing else is ready to run and lone commits are fast on
average (``_may_inline``); a slow disk sends them to the thread. Such an append never
waits, so the caller yields to the loop once it has held it for ``inline_hold`` (1 ms):
a task appending in a loop never starves timers and I/O for longer.

A batch fails as a whole only for a reason that is the log's, not one caller's (the disk
is full): then it is rolled back and every caller gets the error. An append whose own
data is refused (a payload that is not JSON, an id already in the log) fails alone: its
payload is checked before the batch is built, and a constraint error re-runs the batch
one append per transaction so only the culprit gets it.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from pathlib import Path
from typing import Any, Final

import aiosqlite
import orjson

from kernel.errors import ConcurrencyError, StoreClosed, StoreError
from kernel.events import NewEvent, Recorded, registry
from kernel.store.base import ANY, StreamWrite, WriteResult, check_write, describe_expected
from kernel.store.sqlite_ids import (
    FRESH_LENGTH,
    bound_statement,
    indexed_ids_sql,
    positions_sql,
    raise_bound,
)
from kernel.store.sqlite_streams import (
    INDEX_EVERY,
    VERSIONS_CHUNK,
    IndexRow,
    flush_statements,
    stream_version_sql,
    stream_versions_sql,
    unindexed_sql,
)
from kernel.store.tail import Tail
from kernel.store.writes import Append as _Append
from kernel.store.writes import Op as _Op
from kernel.store.writes import Put as _Put
from kernel.store.writes import Stop as _Stop
from kernel.store.writes import settle

__all__ = ["COLUMNS", "GroupCommitWriter"]

log = logging.getLogger("xcore.store")

COLUMNS = "position, stream, version, type, schema, data, meta, recorded_at"
#: ``recorded_at`` before ``id``: a row's first 8 values are the tail's row.
_INSERT_HEAD = (
    "INSERT INTO events (position, stream, version, type, schema, data, meta, recorded_at, id)"
    " VALUES "
)
INSERT = _INSERT_HEAD + "(?, ?, ?, ?, ?, ?, ?, ?, ?)"
#: Rows per multi-row INSERT: one statement per chunk instead of one step per row
#: (9 parameters a row, far under SQLite's limit of 32,766).
_CHUNK = 256
_INSERTS: dict[int, str] = {}
#: Weight of the newest lone commit in the writer's running average of their durations
#: (an exponentially weighted moving average): one outlier of k times the limit moves
#: the average by k/8 of the limit, while a disk that stays slow crosses it within a few
#: commits — at once when a commit takes more than 8 times the limit.
_EWMA_WEIGHT = 1 / 8
#: A commit in the loop's thread that took more than 8 times ``inline_limit`` (a stall,
#: not a slow sync) also keeps lone commits off the loop's thread for this many seconds:
#: a disk that stalls now and then blocks the loop at most once per pause, however fast
#: its commits are in between.
_STALL_PAUSE = 2.0
#: A lone write commits in the loop's thread only while it is small: at most this many
#: events and this many bytes of payload. The running average speaks for small commits;
#: one append of 20,000 events (or of a 50 MB payload) committed there held the loop for
#: its whole insert and sync (~0.4 s here) before the average could notice.
INLINE_EVENTS = 32
INLINE_BYTES = 64 * 1024
#: The writer checkpoints the WAL itself (SQLite's automatic checkpoint is off on its
#: connection) about every this many WAL pages, SQLite's own default: an automatic
#: checkpoint runs inside the commit that crosses the bound, so a lone append
#: committing on the loop's thread would block the loop for the copy and its fsync,
#: and count as a slow commit (see ``_may_inline``). The checkpoint runs on a
#: connection and thread of its own (``_checkpoint_apart``), beside the commits: in the
#: write connection's thread it held every write queued behind it for the copy and its
#: two syncs (~40 ms on a loaded disk, a few times a minute under steady appends).
CHECKPOINT_PAGES = 1000
#: A caller appending in a loop, each append committed in its own task (``_lone``),
#: yields to the event loop once it has held it this long (seconds), not after every
#: append: a turn of the loop costs about as much Python as the rest of such an append,
#: and other tasks, I/O and timers wait at most this long plus one commit.
INLINE_HOLD = 0.001
_perf_counter = time.perf_counter
_Future = asyncio.Future
_running_loop = asyncio.get_running_loop
#: The writer connection's isolation level (sqlite.py opens it so): each transaction
#: begins implicitly, BEGIN IMMEDIATE, before its first INSERT.
_ISOLATION: Final = "IMMEDIATE"
#: Errors of one write's own data (an id already stored, a value larger than SQLite's
#: limit): the batch is retried one write at a time so only its caller gets them.
_OWN_DATA = (sqlite3.IntegrityError, sqlite3.DataError)


def _insert_sql(rows: int) -> str:
    sql = _INSERTS.get(rows)
    if sql is None:
        sql = _INSERTS[rows] = _INSERT_HEAD + ",".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?)"] * rows)
    return sql


#: aiosqlite runs every call in its connection's thread through ``Connection._execute``;
#: using it for a whole batch (insert + commit) saves a thread round trip per commit
#: (~0.1 ms, a fifth of a single durable append here). It is private API, so the
#: public two-call path stays as the fallback.
_ONE_TRIP = hasattr(aiosqlite.Connection, "_execute") and hasattr(aiosqlite.Connection, "_conn")


def _checkpoint(conn: sqlite3.Connection) -> None:
    """A passive checkpoint, in the connection's own thread (as SQLite's automatic one)."""
    # fetchall: the statement runs to its end, so the connection keeps no read
    # transaction open (one would keep the WAL from being reused from its start)
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def _wal_round(path: Path) -> bytes | None:
    """The WAL header's checkpoint sequence number and salts: they change each time the
    WAL is reused from its start (None: no WAL file, or a short one)."""
    try:
        with open(f"{path}-wal", "rb") as f:
            head = f.read(24)
    except OSError:
        return None
    return head[12:24] if len(head) == 24 else None


def _probe_ids(conn: sqlite3.Connection, ids: list[str]) -> None:
    """Refuse ``ids`` (IntegrityError, as the ``UNIQUE`` index on ``events (id)`` of
    format 2 did) when one is in the id index: a read of one hot leaf per id (ids drawn
    by ``new_id`` are time-ordered), no page written. The unindexed end's ids are
    checked in memory before (see ``sqlite_ids.py``)."""
    found = conn.execute(indexed_ids_sql(len(ids)), ids).fetchone()
    if found is not None:
        raise sqlite3.IntegrityError(
            f"UNIQUE constraint failed: events.id ({found[0]!r} is already in the log)"
        )


def _write(
    conn: sqlite3.Connection,
    rows: list[tuple[Any, ...]],
    puts: list[tuple[str, tuple[Any, ...]]],
    probe: Sequence[str] = (),
) -> float:
    """Insert the batch, refuse it if one of the ids ``probe`` is in the id index, and
    commit (in the connection's own thread, or inline in the loop's); returns how long
    it took, in seconds."""
    started = _perf_counter()
    try:
        for i in range(0, len(rows), _CHUNK):
            chunk = rows[i : i + _CHUNK]
            flat = list(chain.from_iterable(chunk))
            # ``data`` and ``meta`` bound as bytearray, stored alike (a BLOB): the sqlite3
            # module binds int, float, str and bytearray directly but sends bytes through
            # its adapter lookup, which fails on a type attribute and formats the error
            # before dropping it — ~3,300 instructions per value, 7% of an append
            flat[5::9] = map(bytearray, flat[5::9])
            flat[6::9] = map(bytearray, flat[6::9])
            conn.execute(_insert_sql(len(chunk)), flat)
        for i in range(0, len(probe), _CHUNK):
            # in the transaction the insert opened (a read of the index it does not touch)
            _probe_ids(conn, list(probe[i : i + _CHUNK]))
        for sql, params in puts:
            conn.execute(sql, params)
        conn.commit()
    except BaseException as exc:
        if isinstance(exc, sqlite3.Error):
            raise  # the writer rolls back (and may retry one write at a time)
        # not SQLite's refusal: a value the sqlite3 module cannot bind (a type that is
        # not valid text, a schema over 64 bits), or an interruption. The chunks
        # inserted before it are in the open transaction: rolled back here, or the
        # next commit (the next batch, the close's index flush) would store a batch
        # whose callers were told it failed
        conn.rollback()
        if isinstance(exc, (UnicodeEncodeError, OverflowError)):
            raise sqlite3.DataError(f"a value SQLite cannot store: {exc}") from exc
        raise
    return _perf_counter() - started


def _bindable_text(value: object) -> bool:
    """Whether ``value`` is text SQLite can store (a ``str`` without lone surrogates)."""
    if type(value) is not str:
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


class GroupCommitWriter:
    """Batches concurrent writes of one SQLite log into single durable transactions."""

    def __init__(
        self,
        path: Path,
        conn: aiosqlite.Connection,
        tail: Tail,
        last: int,
        max_batch: int,
        *,
        unindexed: Sequence[IndexRow] = (),
        unindexed_ids: Mapping[str, int] = {},
        ids_bound: str = "",
        ids_ceiling: str = "",
        index_every: int = INDEX_EVERY,
        inline_limit: float = 0.005,
        inline_hold: float = INLINE_HOLD,
    ) -> None:
        self.path = path
        self._conn = conn
        self._tail = tail
        #: the position of the newest committed event
        self.last = last
        #: the version of each stream seen so far (filled lazily)
        self.versions: dict[str, int] = {}
        self.max_batch = max_batch
        #: why the last batch failed (the disk is full...), None once a batch commits
        self.failure: str | None = None
        #: events after the stream index's mark, as index rows (see sqlite_streams.py)
        self.unindexed: list[IndexRow] = list(unindexed)
        #: the ids of those events, to their positions (see sqlite_ids.py)
        self.unindexed_ids: dict[str, int] = dict(unindexed_ids)
        #: no id of 32 characters in the id index sorts after it (see sqlite_ids.py)
        self.ids_bound = ids_bound
        #: no id at or above it is fresh, nor raises the bound (see sqlite_ids.ceiling);
        #: "" takes every id for one that might be indexed
        self.ids_ceiling = ids_ceiling
        self.index_every = index_every
        # A plain deque and one wake-up future: cheaper than asyncio.Queue's getters.
        self._queue: deque[_Op] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        #: a lone write commits in the loop's thread while its commits take less, on
        #: average (seconds)
        self.inline_limit = inline_limit
        #: the running average of lone writes' commit times, in either thread (seconds)
        self.commit_average = 0.0
        #: lone commits stay off the loop's thread until then (time.perf_counter())
        self._stalled = 0.0
        #: when an append committed in its caller's task last yielded to the loop
        #: (time.perf_counter(); see ``inline_hold``)
        self._yielded_at = 0.0
        #: when the last lone commit in the caller's task ended (time.perf_counter())
        self._lone_ended = 0.0
        #: seconds a caller appending in a loop, each append committed in its own task,
        #: may hold the loop before an append yields to it once; 0 yields after each
        self.inline_hold = inline_hold
        #: lone writes committed in the loop's thread, and in the connection's
        self.inline_commits = 0
        self.thread_commits = 0
        self._ready: deque[Any] | None = None
        #: WAL pages written since the last checkpoint (an estimate, see _commit)
        self.wal_pages = 0
        self.checkpoint_pages = CHECKPOINT_PAGES
        #: the checkpoint in progress (at most one), its thread and connection
        self._checkpointing: asyncio.Future[None] | None = None
        self._checkpoint_thread: ThreadPoolExecutor | None = None
        self._checkpoint_conn: sqlite3.Connection | None = None
        #: the WAL's round at the last checkpoint beside the writes (see _wal_round)
        self._wal_round: bytes | None = None
        #: set when the next checkpoint must run on the write connection, commits
        #: waiting (the write loop runs it between two batches)
        self._hold_for_checkpoint = False
        #: checkpoints done, and those that held the commits back (for tests)
        self.checkpoints = 0
        self.blocking_checkpoints = 0
        #: the Stop is queued (once: a stop cancelled and called again does not repeat it)
        self._stop_sent = False

    def _may_inline(self) -> bool:
        """Whether a lone write may commit in the event loop's own thread: only when no
        other task or callback is ready to run (blocking the loop then delays no one
        already waiting) and lone commits take at most ``inline_limit`` seconds on
        average (``commit_average``, kept over the commits in either thread). One slow
        sync among fast ones (a VM's disk has them every few hundred commits) leaves the
        average under the limit; a disk that stays slow lifts it over within a few
        commits — after one commit of over 8 times the limit — and lone writes go through
        the connection's thread, so the loop stays free while it syncs, until their
        commits are fast again. ``inline_limit`` 0 turns it off."""
        if self.inline_limit <= 0 or self._ready is None or self._ready:
            return False
        return self.commit_average <= self.inline_limit and _perf_counter() >= self._stalled

    def _timed(self, took: float, inline: bool) -> None:
        """Count a lone write's commit time into ``commit_average``; after a stall of
        the loop's thread, keep lone commits off it for ``_STALL_PAUSE`` seconds."""
        self.commit_average += (took - self.commit_average) * _EWMA_WEIGHT
        if inline and took > self.inline_limit / _EWMA_WEIGHT:
            self._stalled = _perf_counter() + _STALL_PAUSE

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._task = asyncio.create_task(self._write_loop(), name="xcore-store-writer")

    def refuse_new(self) -> None:
        """Refuse every later write with StoreClosed (what is queued still commits)."""
        self._stopping = True

    async def stop(self) -> None:
        """Commit everything queued so far, then stop; later writes get StoreClosed."""
        self._stopping = True
        # A stop cancelled while it waits (a close under a timeout) leaves the task and
        # the checkpoint's thread and connection in place: the next stop ends them.
        task = self._task
        if task is not None:
            if not task.done():
                if not self._stop_sent:
                    self._stop_sent = True
                    self._enqueue(_Stop())
                await asyncio.wait({task})
            self._task = None
            if not task.cancelled() and task.exception() is not None:
                exc = task.exception()
                log.error(
                    "the writer of %s had stopped on an error: %r", self.path, exc, exc_info=exc
                )
            self._refuse_queued()
        await self._end_checkpoints()

    def _enqueue(self, op: _Op) -> None:
        self._queue.append(op)
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    def _refuse_queued(self) -> None:
        while self._queue:
            op = self._queue.popleft()
            if not op.future.done():
                if isinstance(op, _Stop):
                    op.future.set_result(None)
                else:
                    op.future.set_exception(StoreClosed(f"{self.path}: the event log is closed"))

    def _check_alive(self) -> None:
        if self._stopping:
            raise StoreClosed(f"{self.path}: the event log is closing or closed")
        if self._task is None or self._task.done():
            raise StoreError(
                f"{self.path}: the log's writer has stopped; reopen the store "
                "(see the log for the error that stopped it)"
            )

    async def append(
        self, events: Sequence[NewEvent], stream: str, expected_version: int | None
    ) -> list[Recorded]:
        answer = self.offer(events, stream, expected_version)
        if isinstance(answer, list):
            if self.turn_due():
                await self.turn()
            return answer
        return await answer

    def offer(
        self, events: Sequence[NewEvent], stream: str, expected_version: int | None
    ) -> list[Recorded] | asyncio.Future[list[Recorded]]:
        """Take an append: its records when it was committed at once, in the caller's
        task (``_lone``), or the future of them once its batch is durable.

        A caller that got the records yields to the loop with :meth:`turn` when it has
        held it for ``inline_hold`` seconds (see ``append``, which does both; the store
        does it inline, one coroutine less per append)."""
        task = self._task
        if self._stopping or task is None or task.done():
            self._check_alive()  # raises, naming why
        if stream not in self.versions:  # a stream the writer knows was checked before
            try:
                stream.encode()
            except UnicodeEncodeError as exc:
                # refused alone: in a batch, SQLite's refusal would fail every other append
                raise StoreError(
                    f"{self.path}: stream name {stream!r} is not valid text: {exc}"
                ) from None
        if len(events) == 1 and not self._queue and _ONE_TRIP:
            wakeup = self._wakeup
            if wakeup is not None and not wakeup.done() and self._may_inline():
                # the writer is idle and nothing else is ready to run: commit here
                records = self._lone(stream, expected_version, events[0])
                if records is not None:
                    return records
        # the C future itself, not loop.create_future(): one Python call less per append
        future: asyncio.Future[list[Recorded]] = _Future(loop=_running_loop())
        self._queue.append(_Append(stream, expected_version, events, future))
        wakeup = self._wakeup  # as _enqueue, inline: this runs once per append
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)
        return future

    def turn_due(self) -> bool:
        """Whether the caller of an append committed in its own task has held the loop
        for ``inline_hold`` since its last :meth:`turn` (then it should take one)."""
        return self._lone_ended - self._yielded_at >= self.inline_hold

    async def turn(self) -> None:
        """Let the loop run once (I/O, timers) after appends committed in the caller's
        task: a caller appending in a loop holds it for at most about ``inline_hold``
        seconds (and one commit) at a time."""
        await asyncio.sleep(0)
        self._yielded_at = _perf_counter()

    def _lone(self, stream: str, expected: int | None, event: NewEvent) -> list[Recorded] | None:
        """Commit one event at once, in the loop's thread, while the writer task is idle:
        the batch path for a lone append without the trip through the queue and the
        writer task (a wake-up, two futures, a turn of the loop). Nothing here awaits,
        so nothing else runs meanwhile: the writer's bookkeeping stays its own.

        None, with nothing written, when the append needs what only the batch path does:
        a stream version not known yet, an explicit id, a version conflict (checked
        against the log there), a payload that is not JSON, a refused insert (the
        writer rolls back here and sorts it out in a batch of its own)."""
        current = self.versions.get(stream)
        if current is None or event.explicit_id or (expected is not ANY and expected != current):
            return None
        if len(event.data) > INLINE_BYTES:
            return None  # too big to hold the loop for (see INLINE_BYTES)
        meta = event.meta
        eid = meta.id
        if type(eid) is not str or eid in self.unindexed_ids:
            return None  # refused: the batch path says so
        try:
            data = orjson.loads(event.data)
            if event.type in registry.versioned:
                data = registry.upcast(event.type, event.schema, data)
            meta_json = meta.to_json()
        except Exception:
            return None  # the batch path names the error to the caller
        p = self.last + 1
        v = current + 1
        now = time.time()
        raw = event.data
        unindexed = self.unindexed
        flush = len(unindexed) + 1 >= self.index_every
        bound = self.ids_bound
        conn = self._conn._conn
        started = _perf_counter()
        try:
            if (len(eid) != FRESH_LENGTH or not bound < eid < self.ids_ceiling) and conn.execute(
                indexed_ids_sql(1), (eid,)
            ).fetchone() is not None:
                # an id the id index might hold (not a fresh one, see sqlite_ids.py), and
                # does: refused, by the batch path (no transaction is open yet)
                return None
            if flush:
                bound = raise_bound(bound, [*self.unindexed_ids, eid], self.ids_ceiling)
                row = (p, stream, v, event.type, event.schema, raw, meta_json, now, eid)
                mark = unindexed[0][2] - 1 if unindexed else self.last
                _write(conn, [row], [*flush_statements(mark, p), bound_statement(bound)])
            else:
                # the one-row case of _write, inline (data and meta bound as bytearray:
                # see _write), and in autocommit mode: one INSERT is its own durable
                # transaction, without the BEGIN and COMMIT the sqlite3 module would
                # prepare (parse) anew for every append
                conn.isolation_level = None
                try:
                    conn.execute(
                        INSERT,
                        (
                            p,
                            stream,
                            v,
                            event.type,
                            event.schema,
                            bytearray(raw),
                            bytearray(meta_json),
                            now,
                            meta.id,
                        ),
                    )
                finally:
                    conn.isolation_level = _ISOLATION
        except BaseException as exc:  # the batch path tries again and reports it
            try:
                conn.rollback()  # nothing of it stays in an open transaction
            except sqlite3.Error as again:
                log.error("rollback on %s after %r failed: %r", self.path, exc, again)
            if not isinstance(exc, Exception):
                raise  # KeyboardInterrupt...: rolled back, and on its way
            return None
        self._lone_ended = ended = _perf_counter()
        took = ended - started
        # _timed, inline
        self.commit_average += (took - self.commit_average) * _EWMA_WEIGHT
        if took > self.inline_limit / _EWMA_WEIGHT:
            self._stalled = ended + _STALL_PAUSE
        self.inline_commits += 1
        self.failure = None
        self.last = p
        self.versions[stream] = v
        # its payload's pages too (up to INLINE_BYTES: 16 pages, not 1)
        if flush:
            self.wal_pages += 1 + (len(raw) >> 12) + len(unindexed) // 25
            self.unindexed = []
            self.unindexed_ids = {}
            self.ids_bound = bound
        else:
            self.wal_pages += 1 + (len(raw) >> 12)
            unindexed.append((stream, v, p))
            self.unindexed_ids[eid] = p
        self._tail.push_one((p, stream, v, event.type, event.schema, raw, meta_json, now))
        if self.wal_pages >= self.checkpoint_pages:
            self._due()  # the writer task starts a checkpoint, beside the commits
        r = Recorded.__new__(Recorded)
        r.position = p
        r.stream = stream
        r.version = v
        r.type = event.type
        r.schema = event.schema
        r.data = data
        r._meta = meta
        r._meta_raw = None
        r.timestamp = now
        r._event = None
        return [r]

    def _due(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    async def append_many(self, writes: Sequence[StreamWrite]) -> list[WriteResult]:
        """Queue every write at once, one after the other, so they join one batch (one
        commit); each is decided and answered alone (see ``EventStore.append_many``)."""
        task = self._task
        if self._stopping or task is None or task.done():
            self._check_alive()  # raises, naming why
        loop = asyncio.get_running_loop()
        answers: list[WriteResult | asyncio.Future[list[Recorded]]] = []
        for w in writes:
            # each write checked before any joins the queue: a bad one is answered in
            # its place, never raised once the writes before it are queued (they would
            # commit unknown to the caller) nor left to fail the whole batch
            try:
                if not isinstance(w, StreamWrite):
                    raise StoreError(
                        f"{self.path}: append_many takes StreamWrite values, not {type(w).__name__}"
                    )
                events = check_write(str(self.path), w.stream, w.events, w.expected_version)
                w.stream.encode()
            except StoreError as exc:
                answers.append(exc)
                continue
            except UnicodeEncodeError as exc:
                answers.append(
                    StoreError(f"{self.path}: stream name {w.stream!r} is not valid text: {exc}")
                )
                continue
            if not events:
                answers.append([])
                continue
            future: asyncio.Future[list[Recorded]] = loop.create_future()
            self._queue.append(_Append(w.stream, w.expected_version, events, future))
            answers.append(future)
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)
        return await settle(answers)

    async def put(self, sql: str, params: tuple[Any, ...]) -> None:
        """Run one more statement (a checkpoint or snapshot upsert) in the next batch."""
        self._check_alive()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._enqueue(_Put(sql, params, future))
        await future

    async def _write_loop(self) -> None:
        queue = self._queue
        loop = asyncio.get_running_loop()
        # the loop's ready callbacks (asyncio's own loop; None under another loop,
        # which then always yields a few times)
        ready = getattr(loop, "_ready", None)
        if not isinstance(ready, deque):
            ready = None
        self._ready = ready
        while True:
            if self._hold_for_checkpoint:
                await self._checkpoint_in_writer()
            if not queue:
                self._maybe_checkpoint()  # after lone appends
                self._wakeup = loop.create_future()
                try:
                    await self._wakeup
                finally:
                    self._wakeup = None
                continue
            op = queue.popleft()
            if isinstance(op, _Stop):
                await self._index_the_end()
                op.future.set_result(None)
                return
            # Let every producer that is ready run first, so they join this batch
            # rather than each waking the writer for a batch of its own. When nothing
            # else is ready to run (a lone producer), no one can join: go at once.
            before = -1
            for _ in range(8):
                if len(queue) == before or (ready is not None and not ready):
                    break
                before = len(queue)
                await asyncio.sleep(0)
            batch: list[_Append | _Put] = [op]
            size = len(op.events) if isinstance(op, _Append) else 1
            stop: _Stop | None = None
            while size < self.max_batch and queue:
                nxt = queue.popleft()
                if isinstance(nxt, _Stop):
                    stop = nxt
                    break
                batch.append(nxt)
                size += len(nxt.events) if type(nxt) is _Append else 1
            try:
                await self._commit(batch)
                self._maybe_checkpoint()
            except BaseException as exc:  # never leave an appender waiting forever
                log.exception(
                    "the writer of %s failed on a batch of %d writes (%d events, positions "
                    "after %d); the batch is refused and the writer %s",
                    self.path,
                    len(batch),
                    sum(len(o.events) for o in batch if isinstance(o, _Append)),
                    self.last,
                    "goes on" if isinstance(exc, Exception) else "stops",
                )
                error = StoreError(f"{self.path}: write failed: {exc!r}")
                for o in batch:
                    if not o.future.done():
                        o.future.set_exception(error)
                if not isinstance(exc, Exception):
                    if stop is not None:
                        stop.future.set_result(None)
                    raise
            if stop is not None:
                await self._index_the_end()
                stop.future.set_result(None)
                return

    async def _write_public(  # pragma: no cover - an aiosqlite without its private runner
        self,
        rows: list[tuple[Any, ...]],
        statements: list[tuple[str, tuple[Any, ...]]],
        probe: list[str],
    ) -> None:
        """The batch through aiosqlite's public calls: a trip per statement."""
        for i in range(0, len(probe), 500):
            chunk = probe[i : i + 500]
            taken = await self._conn.execute_fetchall(indexed_ids_sql(len(chunk)), chunk)
            if taken:
                raise sqlite3.IntegrityError(f"UNIQUE constraint failed: events.id {taken!r}")
        if rows:
            await self._conn.executemany(INSERT, rows)
        for sql, params in statements:
            await self._conn.execute(sql, params)
        await self._conn.commit()

    def _maybe_checkpoint(self) -> None:
        """Start a checkpoint beside the writes once ``checkpoint_pages`` WAL pages were
        written since the last one began (one at a time: the next starts when it ends)."""
        if self.wal_pages < self.checkpoint_pages:
            return
        if self._checkpointing is not None and not self._checkpointing.done():
            return  # the one in progress ends first; its end starts the next
        self.wal_pages = 0
        self._checkpointing = asyncio.ensure_future(self._checkpoint_wal())
        self._checkpointing.add_done_callback(self._checkpointed)

    def _checkpointed(self, done: asyncio.Future[None]) -> None:
        if not done.cancelled() and (exc := done.exception()) is not None:
            log.error("%s: the checkpoint task failed: %r", self.path, exc, exc_info=exc)
        if not self._stopping:
            self._maybe_checkpoint()  # pages written meanwhile

    async def _checkpoint_wal(self) -> None:
        """Copy the WAL into the log file on a connection and thread of its own (never
        the loop's, nor the write connection's: the commits go on meanwhile, SQLite's
        PASSIVE checkpoint takes no lock a writer waits for). A checkpoint that fails is
        logged and tried again after as many pages; nothing is lost (the WAL keeps the
        pages, readers read them from there). Without a connection of its own (it
        cannot be opened), or when the WAL is not reused (see below), the checkpoint
        runs on the write connection, between two batches."""
        try:
            if self._checkpoint_thread is None:
                self._checkpoint_thread = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="xcore-store-checkpoint"
                )
            loop = asyncio.get_running_loop()
            done = await loop.run_in_executor(self._checkpoint_thread, self._checkpoint_apart)
        except sqlite3.Error as exc:
            log.warning("%s: checkpointing the write-ahead log failed: %r", self.path, exc)
            return
        if done is not None:
            self.checkpoints += 1
            round_, self._wal_round = self._wal_round, done
            if round_ is None or done != round_:
                return
            # The WAL is reused from its start by the first commit that begins once
            # every frame is copied; a commit that began during the copy cannot, and
            # writes that never pause leave it no such moment: the WAL was not reused
            # since the last checkpoint and only grows. This once, the commits wait (as
            # they all did before), so it stays bounded.
            log.info(
                "%s: the WAL was not reused since the last checkpoint (writes without a "
                "pause): the next one holds the commits",
                self.path,
            )
            self._wal_round = None
        # (or no connection of its own): the write loop runs it, between two batches
        self._hold_for_checkpoint = True
        self._due()

    async def _checkpoint_in_writer(self) -> None:
        """Checkpoint on the write connection, in its thread; called by the write loop
        between two batches (commits wait meanwhile)."""
        self._hold_for_checkpoint = False
        try:
            if _ONE_TRIP:
                await self._conn._execute(_checkpoint, self._conn._conn)  # type: ignore[no-untyped-call]
            else:  # pragma: no cover - an aiosqlite without its private runner
                await self._conn.execute_fetchall("PRAGMA wal_checkpoint(PASSIVE)")
            self.checkpoints += 1
            self.blocking_checkpoints += 1
        except sqlite3.Error as exc:
            log.warning("%s: checkpointing the write-ahead log failed: %r", self.path, exc)

    def _checkpoint_apart(self) -> bytes | None:
        """In the checkpoint thread: checkpoint on its own connection (opened at the
        first checkpoint); the WAL's round (:func:`_wal_round`, b"" when unknown), or
        None if that connection cannot be opened."""
        conn = self._checkpoint_conn
        if conn is None:
            try:
                conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA busy_timeout=5000")
            except sqlite3.Error as exc:
                log.warning(
                    "%s: no connection of its own for the checkpoint (%r): it runs in the "
                    "writer's thread",
                    self.path,
                    exc,
                )
                return None
            self._checkpoint_conn = conn
        _checkpoint(conn)
        return _wal_round(self.path) or b""

    async def _end_checkpoints(self) -> None:
        """Wait for the checkpoint in progress, then close its connection and thread."""
        running = self._checkpointing
        if running is not None and not running.done():
            await asyncio.wait({running})
        # each reference is dropped only once done: a wait cancelled here leaves them
        # for the next call (closing a connection twice is harmless)
        thread = self._checkpoint_thread
        if thread is None:
            return
        conn = self._checkpoint_conn
        if conn is not None:
            try:
                await asyncio.get_running_loop().run_in_executor(thread, conn.close)
            except sqlite3.Error as exc:
                log.warning("%s: closing the checkpoint's connection failed: %r", self.path, exc)
            self._checkpoint_conn = None
        self._checkpoint_thread = None
        thread.shutdown(wait=False)

    async def _index_the_end(self) -> None:
        """At a clean stop, index the unindexed end (the next open has nothing to reload)."""
        if not self.unindexed:
            return
        bound = raise_bound(self.ids_bound, self.unindexed_ids, self.ids_ceiling)
        try:
            for sql, params in [
                *flush_statements(self.unindexed[0][2] - 1, self.last),
                bound_statement(bound),
            ]:
                await self._conn.execute(sql, params)
            await self._conn.commit()
        except sqlite3.Error as exc:
            await self._rollback(exc)
            log.error(
                "%s: indexing the last %d events at close failed: %r (the next open reads "
                "them from the log instead)",
                self.path,
                len(self.unindexed),
                exc,
            )
            return
        self.unindexed = []
        self.unindexed_ids = {}
        self.ids_bound = bound

    async def _stream_version(self, stream: str) -> int:
        version = self.versions.get(stream)
        if version is None:
            sql, params = stream_version_sql(stream)
            row = await (await self._conn.execute(sql, params)).fetchone()
            version = int(row[0]) if row and row[0] is not None else 0
            self.versions[stream] = version
        return version

    async def _load_versions(self, streams: list[str]) -> None:
        """Learn the versions of ``streams`` (not known yet) in one query per chunk:
        a batch touching 100 streams for the first time (a scheduler's first round
        after boot) makes one trip to the connection's thread, not 100 in a row."""
        for i in range(0, len(streams), VERSIONS_CHUNK):
            chunk = streams[i : i + VERSIONS_CHUNK]
            sql, params = stream_versions_sql(chunk)
            rows = await self._conn.execute_fetchall(sql, params)
            found = {str(row[0]): int(row[1]) for row in rows if row[1] is not None}
            for stream in chunk:
                self.versions[stream] = found.get(stream, 0)

    async def _positions_of(self, ids: list[str]) -> dict[str, int]:
        """The positions of those of ``ids`` already in the log: the unindexed end's
        from memory, the others from the id index (one probe each)."""
        held = self.unindexed_ids
        found = {i: held[i] for i in ids if i in held}
        rest = list({i: None for i in ids if i not in found})
        for n in range(0, len(rest), 500):
            chunk = rest[n : n + 500]
            rows = await self._conn.execute_fetchall(positions_sql(len(chunk)), chunk)
            found.update((str(row[0]), int(row[1])) for row in rows)
        return found

    async def _existing_ids(self, ids: list[str]) -> set[str]:
        try:
            return set(await self._positions_of(ids))
        except (UnicodeEncodeError, TypeError, sqlite3.InterfaceError, sqlite3.ProgrammingError):
            # an id SQLite cannot take (not valid text, a type it does not bind) is in no
            # log: looked up without it, its append is refused alone (``_not_text``, or
            # its meta is not JSON), not the whole batch
            return set(await self._positions_of([i for i in ids if _bindable_text(i)]))

    async def _commit(self, batch: list[_Append | _Put]) -> None:
        conn = self._conn
        appends = [o for o in batch if type(o) is _Append]
        puts = [o for o in batch if type(o) is _Put]
        explicit = [e.meta.id for o in appends for e in o.events if e.explicit_id]
        existing = await self._existing_ids(explicit) if explicit else set()
        held = self.unindexed_ids
        bound = self.ids_bound
        top = self.ids_ceiling
        probe: list[str] = []  # ids the id index might hold (see sqlite_ids.py)
        versions = self.versions
        unknown = list({o.stream: None for o in appends if o.stream not in versions})
        if len(unknown) > 1:
            await self._load_versions(unknown)

        now = time.time()
        position = self.last
        touched: dict[str, int] = {}
        rows: list[tuple[Any, ...]] = []
        fresh_index: list[IndexRow] = []  # the rows' (stream, version, position)
        results: list[tuple[_Append, list[Recorded]]] = []
        failures: list[tuple[_Append, BaseException]] = []
        in_batch: dict[str, int] = {}  # the ids written, to their positions
        # records are built inline (no constructor call per event): the appender's copy
        # of each event, its payload decoded (which also checks it is JSON) and upcast
        new = Recorded.__new__
        loads = orjson.loads
        upcast_types = registry.versioned
        for o in appends:
            stream = o.stream
            events = o.events
            if len(events) == 1:  # the common case: no list, set or inner loop
                e = events[0]
                meta = e.meta
                eid = meta.id
                if type(eid) is not str:  # first: a list would fail the lookups below
                    failures.append((o, self._not_text(stream, eid)))
                    continue
                if eid in existing or eid in in_batch:
                    if e.explicit_id:
                        o.existing = [eid]
                    else:  # reused without marking it explicit: refused, as across batches
                        failures.append((o, self._taken(stream, eid)))
                    continue
                if eid in held:  # not explicit: a fresh id was expected
                    failures.append((o, self._taken(stream, eid)))
                    continue
                current = touched.get(stream)
                if current is None:
                    current = versions.get(stream)
                    if current is None:
                        current = await self._stream_version(stream)
                if o.expected is not ANY and o.expected != current:
                    failures.append(
                        (o, ConcurrencyError(stream, describe_expected(o.expected), current))
                    )
                    continue
                p = position + 1
                v = current + 1
                try:
                    data = loads(e.data)
                    if e.type in upcast_types:
                        data = registry.upcast(e.type, e.schema, data)
                    row = (p, stream, v, e.type, e.schema, e.data, meta.to_json(), now, eid)
                except Exception as exc:
                    failures.append((o, self._not_json(stream, exc)))
                    continue
                r = new(Recorded)
                r.position = p
                r.stream = stream
                r.version = v
                r.type = e.type
                r.schema = e.schema
                r.data = data
                r._meta = meta
                r._meta_raw = None
                r.timestamp = now
                r._event = None
                in_batch[eid] = p
                if len(eid) != FRESH_LENGTH or not bound < eid < top:
                    probe.append(eid)
                position = p
                touched[stream] = v
                rows.append(row)
                fresh_index.append((stream, v, p))
                results.append((o, [r]))
                continue
            odd = next((e.meta.id for e in events if type(e.meta.id) is not str), "")
            if odd != "":  # first: a list would fail the lookups below
                failures.append((o, self._not_text(stream, odd)))
                continue
            kept: list[NewEvent] = []
            seen: set[str] = set()
            for e in events:
                eid = e.meta.id
                if eid not in existing and eid not in in_batch and eid not in seen:
                    seen.add(eid)
                    kept.append(e)
            if not kept:
                o.existing = [e.meta.id for e in events]
                continue
            taken = next((e.meta.id for e in kept if e.meta.id in held), None)
            if taken is not None:  # not explicit (explicit ones are in ``existing``)
                failures.append((o, self._taken(stream, taken)))
                continue
            current = touched.get(stream)
            if current is None:
                current = versions.get(stream)
                if current is None:
                    current = await self._stream_version(stream)
            if o.expected is not ANY and o.expected != current:
                failures.append(
                    (o, ConcurrencyError(stream, describe_expected(o.expected), current))
                )
                continue
            records: list[Recorded] = []
            op_rows: list[tuple[Any, ...]] = []
            p, v = position, current
            try:
                for e in kept:
                    p += 1
                    v += 1
                    meta = e.meta
                    records.append(Recorded.of(p, stream, v, e, now))
                    op_rows.append(
                        (p, stream, v, e.type, e.schema, e.data, meta.to_json(), now, meta.id)
                    )
            except Exception as exc:
                failures.append((o, self._not_json(stream, exc)))
                continue
            in_batch.update([(r[8], r[0]) for r in op_rows])
            probe.extend([i for i in seen if len(i) != FRESH_LENGTH or not bound < i < top])
            position, touched[stream] = p, v
            rows.extend(op_rows)
            fresh_index.extend([(stream, r[2], r[0]) for r in op_rows])
            results.append((o, records))

        if any(isinstance(f, ConcurrencyError) for _, f in failures) and await self._resync():
            # a version the writer had in memory was stale: another process wrote
            await self._commit(batch)
            return
        # only with a transaction to ride in (a batch of repeats writes nothing)
        flush = bool(rows or puts) and len(self.unindexed) + len(fresh_index) >= self.index_every
        if rows or puts:
            try:
                statements = [(p.sql, p.params) for p in puts]
                if flush:
                    bound = raise_bound(bound, [*self.unindexed_ids, *in_batch], top)
                    mark = self.unindexed[0][2] - 1 if self.unindexed else self.last
                    statements += flush_statements(mark, position)
                    statements.append(bound_statement(bound))
                if not _ONE_TRIP:  # pragma: no cover - an aiosqlite without its private runner
                    await self._write_public(rows, statements, probe)
                elif len(batch) > 1:
                    # one trip to the connection's thread for the whole transaction
                    await conn._execute(_write, conn._conn, rows, statements, probe)  # type: ignore[no-untyped-call]
                elif len(rows) > INLINE_EVENTS or sum([len(r[5]) for r in rows]) > INLINE_BYTES:
                    # too big to hold the loop for, and not counted in the average of
                    # lone commits: it speaks for small ones (see INLINE_EVENTS)
                    await conn._execute(_write, conn._conn, rows, statements, probe)  # type: ignore[no-untyped-call]
                    self.thread_commits += 1
                elif self._may_inline():
                    # a lone write with nothing else ready to run: commit here, saving
                    # the hop to the connection's thread and back (see _may_inline)
                    self._timed(_write(conn._conn, rows, statements, probe), True)
                    self.inline_commits += 1
                else:
                    self._timed(
                        await conn._execute(_write, conn._conn, rows, statements, probe),  # type: ignore[no-untyped-call]
                        False,
                    )
                    self.thread_commits += 1
            except sqlite3.Error as exc:
                await self._rollback(exc)
                if isinstance(exc, sqlite3.IntegrityError) and await self._resync():
                    await self._commit(batch)  # again, from the log as it now is
                    return
                ops: list[_Append | _Put] = [o for o, _ in results] + list(puts)
                if isinstance(exc, _OWN_DATA) and len(batch) > 1:
                    # one caller's data broke a constraint or a limit (a row bigger than
                    # SQLite takes): find it, one op per transaction. The batch counts,
                    # not the ops that wrote rows: with one of those, the repeats and
                    # refusals beside it got its error (an idempotent retry refused for
                    # another caller's id, a version conflict reported as that id)
                    for o, failure in failures:
                        if not o.future.done():
                            o.future.set_exception(failure)
                    for a in appends:
                        if a.existing is not None:
                            a.existing = None
                            ops.append(a)
                    for op in ops:
                        await self._commit([op])
                    return
                self._fail(batch, exc)
                return

        self.failure = None
        self.last = position
        self.versions.update(touched)
        # pages this commit added to the WAL, about: a table leaf at least, one more per
        # ~12 rows of ~300 bytes, the stream and id indexes when flushed
        # ~12 rows of ~300 bytes, the stream and id indexes when flushed; and the bytes
        # of larger payloads (overflow pages: 30 KB events counted 1/12 of a page each
        # let the WAL reach the whole log, 233 MB for 8,000, before any checkpoint)
        big = sum([len(r[5]) for r in rows]) - 300 * len(rows)
        self.wal_pages += (
            1
            + len(rows) // 12
            + (big >> 12 if big > 0 else 0)
            + (len(self.unindexed) // 25 if flush else 0)
        )
        if flush:
            self.unindexed = []
            self.unindexed_ids = {}
            self.ids_bound = bound
        else:
            self.unindexed.extend(fresh_index)
            self.unindexed_ids.update(in_batch)
        if rows:
            # the stored row without its id (the INSERT lists recorded_at before id)
            self._tail.push([r[:8] for r in rows])
        for o, records in results:
            if not o.future.done():
                o.future.set_result(records)
        for o, failure in failures:
            if not o.future.done():
                o.future.set_exception(failure)
        for put in puts:
            if not put.future.done():
                put.future.set_result(None)
        for a in appends:
            if a.existing is not None and not a.future.done():
                try:
                    a.future.set_result(await self._by_ids(a.existing))
                except sqlite3.Error as exc:
                    a.future.set_exception(StoreError(f"{self.path}: {exc}"))

    async def _resync(self) -> bool:
        """After a refused insert or a version conflict: if another process wrote to the log behind the
        writer's back (a foreign sqlite3 connection), take the log as it now is — its
        last position, versions and unindexed end — so appends go on after it rather
        than being refused forever. True when the log had changed."""
        try:
            row = await (await self._conn.execute("SELECT MAX(position) FROM events")).fetchone()
            disk = int(row[0] or 0) if row else 0
            if disk == self.last:
                return False
            end = list(await self._conn.execute_fetchall(unindexed_sql()))
        except sqlite3.Error as exc:
            log.error("%s: could not reread the log's end: %r", self.path, exc)
            return False
        log.error(
            "%s: another process wrote to the log (it ends at position %d, this writer "
            "had written up to %d); appends go on after its end — only xcore should "
            "write an event log (`xcore replay verify` checks it)",
            self.path,
            disk,
            self.last,
        )
        self.last = disk
        self.versions.clear()
        self.unindexed = [(str(r[0]), int(r[1]), int(r[2])) for r in end]
        self.unindexed_ids = {str(r[3]): int(r[2]) for r in reversed(end)}
        # the tail holds only contiguous positions: readers read the log itself from now
        self._tail.reset(disk)
        self._tail.push(())
        return True

    async def _rollback(self, cause: sqlite3.Error) -> None:
        try:
            await self._conn.rollback()
        except sqlite3.Error as exc:
            log.error(
                "rollback on %s after %r failed: %r (SQLite rolls a failed transaction "
                "back itself when it can; the writer goes on)",
                self.path,
                cause,
                exc,
            )

    def _fail(self, batch: list[_Append | _Put], exc: sqlite3.Error) -> None:
        """Fail every write of ``batch`` with ``exc``; an append's error names its
        stream (in an append_many, each write learns which of them failed)."""
        if isinstance(exc, sqlite3.IntegrityError):
            verb = "refused"
            reason = f"{exc} (an event id already in the log, given without marking it explicit?)"
        elif isinstance(exc, sqlite3.DataError):  # the caller's data, not the log's health
            verb = "refused"
            reason = f"{exc} (an event larger than SQLite stores, or a value it cannot?)"
        else:
            verb = "failed"
            reason = (
                f"the disk is full ({exc})"
                if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc)
                else str(exc)
            )
            self.failure = reason
            log.error("event log write failed on %s: %s", self.path, exc)
        for op in batch:
            if not op.future.done():
                what = f"append to stream {op.stream!r}" if type(op) is _Append else "write"
                op.future.set_exception(
                    StoreError(f"{self.path}: {what} {verb}, nothing was written: {reason}")
                )

    def _not_json(self, stream: str, exc: Exception) -> StoreError:
        return StoreError(
            f"{self.path}: append to stream {stream!r} refused, nothing was written: an "
            f"event refused, not JSON: {exc}"
        )

    def _not_text(self, stream: str, eid: object) -> StoreError:
        return StoreError(
            f"{self.path}: append to stream {stream!r} refused, nothing was written: an "
            f"event id must be text, not {eid!r}"
        )

    def _taken(self, stream: str, eid: str) -> StoreError:
        return StoreError(
            f"{self.path}: append to stream {stream!r} refused, nothing was written: the "
            f"event id {eid!r} is already in the log (given without marking it explicit?)"
        )

    async def _by_ids(self, ids: list[str]) -> list[Recorded]:
        positions = sorted(set((await self._positions_of(ids)).values()))
        rows: list[Any] = []
        for n in range(0, len(positions), 500):
            chunk = positions[n : n + 500]
            marks = ",".join("?" * len(chunk))
            rows.extend(
                await self._conn.execute_fetchall(
                    f"SELECT {COLUMNS} FROM events WHERE position IN ({marks}) ORDER BY position",
                    chunk,
                )
            )
        return Recorded.from_rows(rows)
