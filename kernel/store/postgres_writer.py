"""The group-commit writer of the PostgreSQL store.

One task per node owns a write connection. Every append (and checkpoint, snapshot or
archive write) waiting when it becomes free joins one transaction; each caller's future
resolves once that transaction has committed. Inside the transaction, under the log's
advisory lock (see ``postgres.py``: commits happen in position order), it reads the
last position, the versions of the streams it touches and which event ids are already
stored, then inserts the batch in one statement and notifies the other nodes.

Nothing is cached between batches: other nodes write too. A connection lost mid-batch
is replaced and the batch is run again; because then every id is checked against the log
first, a batch whose commit did succeed before the loss is not stored twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import asyncpg
import orjson

from kernel.errors import ConcurrencyError, StoreClosed, StoreError
from kernel.events import NewEvent, Recorded, registry
from kernel.store.base import ANY, StreamWrite, WriteResult, check_write, describe_expected
from kernel.store.tail import Row
from kernel.store.writes import Append as _Append
from kernel.store.writes import Op as _Op
from kernel.store.writes import Put as _Put
from kernel.store.writes import Stop as _Stop
from kernel.store.writes import settle

if TYPE_CHECKING:
    from kernel.store.postgres import PostgresStore

__all__ = ["COLUMNS", "CONNECTION_ERRORS", "PostgresWriter"]

log = logging.getLogger("xcore.store")

#: Errors after which a connection is gone but a new one may work.
CONNECTION_ERRORS: Final = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.ConnectionFailureError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    # a connection the server dropped mid-operation can be left in a broken state
    asyncpg.exceptions.InternalClientError,
    TimeoutError,
)

#: The writer only looks rows up by index (ids, stream versions, the last position); a
#: log that grew since its statistics were taken must not make it scan the whole table.
#: Ordered commits need each statement after the lock to see every earlier commit: READ
#: COMMITTED, whatever the server's or role's default isolation is (under a stricter one
#: a batch that waited for the lock reads a stale last position: refused, run again).
WRITER_SETTINGS: Final = {
    "enable_seqscan": "off",
    "default_transaction_isolation": "read committed",
}

COLUMNS = "position, stream, version, type, schema, data, meta, recorded_at"
#: Read under the ordering lock (its snapshot is taken after the lock is held).
HEAD = (
    "SELECT 0, NULL::text, COALESCE(MAX(position), 0) FROM events"
    " UNION ALL SELECT 1, stream, MAX(version) FROM events"
    " WHERE stream = ANY($1::text[]) GROUP BY stream"
    " UNION ALL SELECT 2, id, 0 FROM events WHERE id = ANY($2::text[])"
)
INSERT = (
    "INSERT INTO events (position, stream, version, type, schema, data, meta, id, recorded_at)"
    " SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::text[], $5::int[],"
    " $6::bytea[], $7::bytea[], $8::text[], $9::float8[])"
)
#: The batch's rows, and the notification of its last position (sent at commit).
INSERT_NOTIFY = f"WITH inserted AS ({INSERT} RETURNING 1) SELECT pg_notify($10, $11)"

#: The common batch in ONE trip to the server: a single statement outside any explicit
#: transaction (so it is its own transaction, committed when it returns) that takes the
#: ordering lock, checks the batch's assumptions, inserts and notifies. Each statement
#: of a PL/pgSQL function sees the rows committed before it started (READ COMMITTED), so
#: the reads after the lock see every earlier commit, as in the general path.
#: Assumptions (checked under the lock; when one is not met nothing is written and
#: ``heads`` is NULL): none of ``check_ids`` is stored yet (else ``existing`` lists the
#: stored ones), and each stream ``streams[check_stream[k]]`` is at version
#: ``check_base[k]``. Event ``n`` of the batch gets position ``last + n`` and version
#: ``base(its stream) + ev_off[n]``. ``heads``: the last position before the batch, then
#: each stream's version before it.
APPEND_FUNCTION_NAME: Final = "xcore_append_v1"
APPEND_FUNCTION: Final = """
CREATE OR REPLACE FUNCTION xcore_append_v1(
    lock_key BIGINT, channel TEXT, now DOUBLE PRECISION, streams TEXT[], check_ids TEXT[],
    check_stream INT[], check_base BIGINT[], ev_stream INT[], ev_off BIGINT[],
    ev_type TEXT[], ev_schema INT[], ev_data BYTEA[], ev_meta BYTEA[], ev_id TEXT[],
    OUT heads BIGINT[], OUT existing TEXT[]
) LANGUAGE plpgsql AS $$
DECLARE
    last BIGINT;
    bases BIGINT[];
BEGIN
    PERFORM pg_advisory_xact_lock(lock_key);
    IF cardinality(check_ids) > 0 THEN
        SELECT array_agg(e.id) INTO existing FROM events e WHERE e.id = ANY(check_ids);
        IF existing IS NOT NULL THEN
            RETURN;
        END IF;
    END IF;
    SELECT array_agg(
               COALESCE((SELECT MAX(e.version) FROM events e WHERE e.stream = s.name), 0)
               ORDER BY s.i)
        INTO bases FROM unnest(streams) WITH ORDINALITY AS s(name, i);
    IF EXISTS (SELECT 1 FROM unnest(check_stream, check_base) AS c(i, v)
               WHERE bases[c.i] <> c.v) THEN
        RETURN;
    END IF;
    SELECT COALESCE(MAX(position), 0) INTO last FROM events;
    INSERT INTO events (position, stream, version, type, schema, data, meta, id, recorded_at)
        SELECT last + x.n, streams[x.s], bases[x.s] + x.off, x.type, x.schema, x.data,
               x.meta, x.id, now
        FROM unnest(ev_stream, ev_off, ev_type, ev_schema, ev_data, ev_meta, ev_id)
             WITH ORDINALITY AS x(s, off, type, schema, data, meta, id, n);
    PERFORM pg_notify(channel, (last + cardinality(ev_id))::text);
    heads := last || bases;
END $$;
"""
#: The comment that marks the function as the store's own (a user's function of the same
#: name in the log's schema must never be taken for it).
APPEND_FUNCTION_MARK: Final = "xcore event log: append, version 1"
#: The function's body as PostgreSQL keeps it (``prosrc``): a log created before the
#: mark existed is recognized by it.
APPEND_FUNCTION_BODY: Final = APPEND_FUNCTION.split("$$")[1]
APPEND_CALL: Final = (
    f"SELECT heads, existing FROM {APPEND_FUNCTION_NAME}($1, $2, $3, $4::text[], $5::text[], $6::int[],"
    " $7::bigint[], $8::int[], $9::bigint[], $10::text[], $11::int[], $12::bytea[],"
    " $13::bytea[], $14::text[])"
)


class _Refused(Exception):
    """The server (or the driver) refused a batch for its content, not its connection."""

    def __init__(self, error: StoreError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass
class _Outcome:
    """What one batch decided for each of its operations (applied after the commit)."""

    results: list[tuple[_Append, list[Recorded]]] = field(default_factory=list)
    failures: list[tuple[_Append, BaseException]] = field(default_factory=list)
    existing: list[tuple[_Append, list[str]]] = field(default_factory=list)
    committed: list[Recorded] = field(default_factory=list)
    #: the committed rows as stored (original schema and bytes), for the tail
    rows: list[Row] = field(default_factory=list)


class PostgresWriter:
    """Batches this node's concurrent writes into single ordered transactions."""

    def __init__(self, store: PostgresStore, on_commit: Callable[[list[Row]], None]) -> None:
        self.store = store
        self._on_commit = on_commit
        self._queue: asyncio.Queue[_Op] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._conn: asyncpg.Connection | None = None

    def _settings(self) -> dict[str, str]:
        """The writer's session: READ COMMITTED, index lookups, and a bound on how long
        its transaction may sit idle: a node frozen inside one (a stopped process, a VM
        paused, a GC pause) holds the ordering lock, and every node's writes would wait
        for it to wake up; the server ends that session instead, the lock is released,
        and the frozen node, when it wakes, finds its connection lost and runs its batch
        again (safely: the ids are checked first)."""
        idle = max(1, round(self.store.idle_in_transaction_timeout * 1000))
        return {**WRITER_SETTINGS, "idle_in_transaction_session_timeout": str(idle)}

    async def start(self) -> None:
        self._conn = await self.store.connect(self._settings())
        self._task = asyncio.create_task(self._write_loop(), name="xcore-pg-writer")

    async def stop(self) -> None:
        """Commit everything queued so far, then stop."""
        task, self._task = self._task, None
        if task is not None:
            stop = _Stop()
            self._queue.put_nowait(stop)
            # asyncio.wait, never wait_for or a bare await under suppress(BaseException):
            # a cancellation of the caller must go through, not be swallowed
            limit = self.store.reconnect_timeout + self.store.command_timeout + 5
            await asyncio.wait([task], timeout=limit)
            if not task.done():
                log.error(
                    "%s: the log's writer did not finish its queue within %gs; cancelled",
                    self.store.location,
                    limit,
                )
                task.cancel()
                await asyncio.wait([task], timeout=5)
        # anything still queued (the writer died) gets an answer, never a hang
        while not self._queue.empty():
            op = self._queue.get_nowait()
            if not op.future.done():
                if isinstance(op, _Stop):
                    op.future.set_result(None)
                else:
                    op.future.set_exception(StoreClosed(f"{self.store.location}: closed"))
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close(timeout=2)
            conn.terminate()

    def _check_alive(self) -> None:
        if self._task is None or self._task.done():
            raise StoreError(
                f"{self.store.location}: the log's writer has stopped; reopen the store "
                "(see the log for the error that stopped it)"
            )

    async def append(
        self, events: Sequence[NewEvent], stream: str, expected_version: int | None
    ) -> list[Recorded]:
        self._check_alive()
        future: asyncio.Future[list[Recorded]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Append(stream, expected_version, events, future))
        return await future

    async def append_many(self, writes: Sequence[StreamWrite]) -> list[WriteResult]:
        """Queue every write at once, one after the other, so they join one batch (one
        transaction); each is decided and answered alone (see ``EventStore.append_many``)."""
        self._check_alive()
        loop = asyncio.get_running_loop()
        answers: list[WriteResult | asyncio.Future[list[Recorded]]] = []
        for w in writes:
            # checked before any joins the queue: a bad write is answered in its place,
            # never raised once the writes before it are queued nor left to fail the batch
            try:
                if not isinstance(w, StreamWrite):
                    raise StoreError(
                        f"{self.store.location}: append_many takes StreamWrite values, "
                        f"not {type(w).__name__}"
                    )
                events = check_write(self.store.location, w.stream, w.events, w.expected_version)
            except StoreError as exc:
                answers.append(exc)
                continue
            if not events:
                answers.append([])
                continue
            future: asyncio.Future[list[Recorded]] = loop.create_future()
            self._queue.put_nowait(_Append(w.stream, w.expected_version, events, future))
            answers.append(future)
        return await settle(answers)

    async def put(self, sql: str, params: tuple[Any, ...]) -> None:
        """Run one more statement (checkpoint, snapshot, archive) in the next batch."""
        self._check_alive()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Put(sql, params, future))
        await future

    async def _write_loop(self) -> None:
        queue = self._queue
        while True:
            op = await queue.get()
            if isinstance(op, _Stop):
                op.future.set_result(None)
                return
            # let every producer that is ready join this batch
            for _ in range(4):
                before = queue.qsize()
                await asyncio.sleep(0)
                if queue.qsize() == before:
                    break
            batch: list[_Append | _Put] = [op]
            size = len(op.events) if isinstance(op, _Append) else 1
            stop: _Stop | None = None
            while size < self.store.max_batch:
                try:
                    nxt = queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if isinstance(nxt, _Stop):
                    stop = nxt
                    break
                batch.append(nxt)
                size += len(nxt.events) if isinstance(nxt, _Append) else 1
            try:
                try:
                    await self._commit_with_retry(batch)
                except _Refused:
                    # the server refused something in the batch (a NUL byte in a stream
                    # name, an oversized row...): each operation alone, so only the
                    # culprit fails
                    for op in batch:
                        try:
                            await self._commit_with_retry([op])
                        except _Refused as one:
                            op.future.set_exception(one.error)
            except BaseException as exc:  # never leave an appender waiting forever
                error = (
                    exc
                    if isinstance(exc, StoreError)
                    else StoreError(
                        f"{self.store.location}: append failed, nothing was written: "
                        f"{type(exc).__name__}: {exc}"
                    )
                )
                if not isinstance(exc, StoreError):
                    log.exception("event log writer failed on %s", self.store.location)
                for o in batch:
                    if not o.future.done():
                        o.future.set_exception(error)
                if not isinstance(exc, Exception):
                    raise
            if stop is not None:
                stop.future.set_result(None)
                return

    async def _commit_with_retry(self, batch: list[_Append | _Put]) -> None:
        tries = 0

        async def attempt() -> _Outcome:
            nonlocal tries
            tries += 1
            # run again after a lost connection: its commit may have succeeded
            again = tries > 1
            conn = self._conn
            if conn is None or conn.is_closed():
                self._conn = None
                conn = self._conn = await self._reconnect()
            try:
                return await self._commit(conn, batch, again)
            except CONNECTION_ERRORS:
                # a new connection next time; the ids check makes running again safe
                conn.terminate()
                self._conn = None
                raise

        outcome = await self.store.retrying("append", attempt)
        if outcome.rows:
            self._on_commit(outcome.rows)
        for o, records in outcome.results:
            if not o.future.done():
                o.future.set_result(records)
        for o, failure in outcome.failures:
            if not o.future.done():
                o.future.set_exception(failure)
        for op in batch:
            if isinstance(op, _Put) and not op.future.done():
                op.future.set_result(None)
        for o, ids in outcome.existing:
            if not o.future.done():
                try:
                    o.future.set_result(await self._by_ids(ids))
                except Exception as exc:
                    o.future.set_exception(StoreError(f"{self.store.location}: {exc}"))

    async def _reconnect(self) -> asyncpg.Connection:
        from kernel.store.postgres import Reconnecting, Unreachable

        try:
            return await self.store.connect(self._settings())
        except Unreachable as exc:
            # unreachable for now: let retrying() back off and try again
            raise Reconnecting(f"a new connection failed: {exc.reason}") from exc
        except StoreError as exc:
            # refused (credentials changed, database dropped...): retried too, in case
            # it is passing, and explained when it lasts
            raise Reconnecting(str(exc)) from exc

    async def _commit(
        self, conn: asyncpg.Connection, batch: list[_Append | _Put], again: bool
    ) -> _Outcome:
        appends = [o for o in batch if isinstance(o, _Append)]
        puts = [o for o in batch if isinstance(o, _Put)]
        out = _Outcome()
        try:
            # the common batch (appends only, run for the first time) in one trip; the
            # general path below when it is not, or when its assumptions do not hold
            if appends and not puts and not again and self.store.fast_append:
                rest = await self._commit_fast(conn, appends, out)
                if rest is None:
                    return out
                appends = rest
            # BEGIN and (for appends) the ordering lock in one trip to the server
            lock = f"; SELECT pg_advisory_xact_lock({int(self.store.lock_key)})" if appends else ""
            await conn.execute("BEGIN" + lock)
            try:
                if appends:
                    await self._insert(conn, appends, out, again)
                for p in puts:
                    await conn.execute(p.sql, *p.params)
                await conn.execute("COMMIT")
            except BaseException:
                if not conn.is_closed() and conn.is_in_transaction():
                    with contextlib.suppress(Exception):
                        await conn.execute("ROLLBACK")
                raise
        except asyncpg.PostgresError as exc:
            if isinstance(exc, asyncpg.PostgresConnectionError):
                raise
            raise _Refused(
                StoreError(f"{self.store.location}: append failed, nothing was written: {exc}")
            ) from exc
        except (ValueError, TypeError, UnicodeError, asyncpg.DataError) as exc:
            # refused while encoding the arguments, before the server saw them
            if not conn.is_closed() and conn.is_in_transaction():
                with contextlib.suppress(Exception):
                    await conn.execute("ROLLBACK")
            raise _Refused(
                StoreError(f"{self.store.location}: append refused, nothing was written: {exc}")
            ) from exc
        return out

    async def _insert(
        self, conn: asyncpg.Connection, appends: list[_Append], out: _Outcome, again: bool
    ) -> None:
        """Inside the transaction, under the ordering lock: decide, insert, notify."""
        store = self.store
        # ids the caller chose may be in the log already; fresh ones only if this batch
        # is run again (its first commit may have succeeded before the connection broke)
        ids = list({e.meta.id for o in appends for e in o.events if again or e.explicit_id})
        streams = list({o.stream for o in appends})
        position = 0
        versions: dict[str, int] = {}
        existing: set[str] = set()
        # the last position, the streams' versions and the ids already stored: one trip
        for kind, key, value in await conn.fetch(HEAD, streams, ids):
            if kind == 0:
                position = int(value)
            elif kind == 1:
                versions[key] = int(value)
            else:
                existing.add(key)
        now = time.time()
        cols: list[list[Any]] = [[] for _ in range(9)]
        in_batch: set[str] = set()
        for o in appends:
            fresh: list[NewEvent] = []
            seen: set[str] = set()
            for e in o.events:
                i = e.meta.id
                if i not in existing and i not in in_batch and i not in seen:
                    seen.add(i)
                    fresh.append(e)
            if not fresh:
                out.existing.append((o, [e.meta.id for e in o.events]))
                continue
            current = versions.get(o.stream, 0)
            if o.expected is not ANY and o.expected != current:
                out.failures.append(
                    (o, ConcurrencyError(o.stream, describe_expected(o.expected), current))
                )
                continue
            in_batch |= seen
            records: list[Recorded] = []
            for e in fresh:
                position += 1
                current += 1
                row = (position, o.stream, current, e.type, e.schema, e.data, e.meta.to_json(),
                       e.meta.id, now)  # fmt: skip
                for col, value in zip(cols, row, strict=True):
                    col.append(value)
                out.rows.append((*row[:7], now))
                records.append(Recorded.of(position, o.stream, current, e, now))
            versions[o.stream] = current
            out.results.append((o, records))
            out.committed.extend(records)
        if out.committed:
            await conn.execute(INSERT_NOTIFY, *cols, store.channel, str(position))

    async def _commit_fast(
        self, conn: asyncpg.Connection, appends: list[_Append], out: _Outcome
    ) -> list[_Append] | None:
        """The batch through ``APPEND_FUNCTION``; None when it is decided, else the
        appends left for the general path (nothing of theirs written).

        An append whose every id is stored already (a retried claim another node won) is
        answered from the log, and the others are tried again in one trip: a losing claim
        costs no trip under the ordering lock.
        """
        for _ in range(3):
            existing = await self._insert_fast(conn, appends, out)
            if existing is None:
                return None
            if not existing:
                return appends
            rest: list[_Append] = []
            answered: list[tuple[_Append, list[str]]] = []
            for o in appends:
                ids = [e.meta.id for e in o.events]
                stored = [i in existing for i in ids]
                if all(stored):
                    answered.append((o, ids))
                elif any(stored):
                    return appends  # part of an append is stored: the general path
                else:
                    rest.append(o)
            out.existing.extend(answered)
            appends = rest
            if not appends:
                return None
        return appends

    async def _insert_fast(
        self, conn: asyncpg.Connection, appends: list[_Append], out: _Outcome
    ) -> set[str] | None:
        """The batch in one statement (``APPEND_FUNCTION``): None once committed, else
        the ids found stored (empty: another assumption failed); nothing written then.

        Assumes that every expected version holds as if every append before it in the
        batch succeeded, and that no id of the batch is stored yet (a repeated id inside
        the batch, or an expected version that cannot hold, sends the batch to the
        general path at once). The server checks the assumptions under the lock.
        """
        streams: dict[str, int] = {}
        offsets: dict[str, int] = {}
        check_stream: list[int] = []
        check_base: list[int] = []
        check_ids: list[str] = []
        seen: set[str] = set()
        ev_stream: list[int] = []
        ev_off: list[int] = []
        types: list[str] = []
        schemas: list[int] = []
        datas: list[bytes] = []
        metas: list[bytes] = []
        ids: list[str] = []
        decoded: list[Any] = []
        loads, versioned, upcast = orjson.loads, registry.versioned, registry.upcast
        for o in appends:
            index = streams.setdefault(o.stream, len(streams) + 1)
            off = offsets.get(o.stream, 0)
            if o.expected is not ANY:
                if o.expected < off:
                    return set()
                check_stream.append(index)
                check_base.append(o.expected - off)
            for e in o.events:
                meta = e.meta
                i = meta.id
                if i in seen:
                    return set()
                seen.add(i)
                if e.explicit_id:
                    check_ids.append(i)
                # decoded now: a payload that is not JSON fails before anything is sent
                data = loads(e.data)
                decoded.append(upcast(e.type, e.schema, data) if e.type in versioned else data)
                off += 1
                ev_stream.append(index)
                ev_off.append(off)
                types.append(e.type)
                schemas.append(e.schema)
                datas.append(e.data)
                metas.append(meta.to_json())
                ids.append(i)
            offsets[o.stream] = off
        now = time.time()
        heads, existing = await conn.fetchrow(
            APPEND_CALL, self.store.lock_key, self.store.channel, now, list(streams),
            check_ids, check_stream, check_base, ev_stream, ev_off, types, schemas, datas,
            metas, ids,
        )  # fmt: skip
        if heads is None:
            return set(existing or ())
        # committed: nothing below may fail (running the batch again would store it twice)
        last = heads[0]
        n = 0
        rows = out.rows
        for o in appends:
            base = heads[streams[o.stream]]
            records: list[Recorded] = []
            for e in o.events:
                meta = e.meta
                position = last + n + 1
                version = base + ev_off[n]
                rows.append((position, o.stream, version, e.type, e.schema, e.data, metas[n], now))
                records.append(
                    Recorded(position, o.stream, version, e.type, e.schema, decoded[n], meta, now)
                )
                n += 1
            out.results.append((o, records))
            out.committed.extend(records)
        return None

    async def _by_ids(self, ids: list[str]) -> list[Recorded]:
        rows = await self.store._fetch(
            f"SELECT {COLUMNS} FROM events WHERE id = ANY($1::text[]) ORDER BY position", ids
        )
        return Recorded.from_rows(rows)
