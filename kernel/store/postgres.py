"""The shared store: one PostgreSQL database that several xcore nodes write at once.

Guarantee: positions are gapless, and a reader on any node sees every event exactly in
position order — it never passes an event that commits late. Mechanism: **ordered
commits**. Every write transaction first takes one transaction-level advisory lock,
then reads the last position, assigns the next ones and commits; PostgreSQL releases
the lock only after the commit is visible. So transactions commit in position order,
the committed rows are always a prefix ``1..N``, and ``position > after`` can never
skip a row that appears later. The lock is held for a few statements per *batch*
(``postgres_writer.py`` group-commits every append waiting on a node), not per event.

Live readers wake through LISTEN/NOTIFY (``postgres_follow.py``): each commit notifies
its last position, every node's follower reads what it has not seen into its in-memory
tail and wakes the subscribers. A lost connection is retried with backoff (writer,
readers and listener alike) for ``reconnect_timeout`` seconds before an error surfaces;
the follower then catches up from its last position, so a subscriber misses nothing.

The store creates and versions its own tables (``xcore_meta`` holds the format), makes
the log append-only with a trigger, and refuses with a clear message a server it
cannot reach, credentials it is refused, and a schema that belongs to another
application. Checkpoints are kept per ``scope`` (the node id: each node's subscribers
have their own positions); snapshots of projections, pure folds, are shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, Final, TypeVar
from urllib.parse import unquote, urlsplit

import asyncpg

from kernel.errors import StoreClosed, StoreCorrupt, StoreError
from kernel.events import NewEvent, Recorded
from kernel.store.base import (
    ANY,
    Snapshot,
    StreamWrite,
    WriteResult,
    check_limit,
    check_types,
    check_write,
)
from kernel.store.dsn import redact_dsn
from kernel.store.postgres_follow import Follower
from kernel.store.postgres_writer import (
    APPEND_FUNCTION,
    APPEND_FUNCTION_BODY,
    APPEND_FUNCTION_MARK,
    APPEND_FUNCTION_NAME,
    COLUMNS,
    CONNECTION_ERRORS,
    PostgresWriter,
)
from kernel.store.tail import Row, Tail
from kernel.store.versions import VersionReads

__all__ = ["FORMAT", "SCHEMA", "PostgresStore", "redact_dsn"]

log = logging.getLogger("xcore.store")

T = TypeVar("T")

#: Layout version of the tables below, kept in ``xcore_meta``.
FORMAT: Final = 1
#: The tables this store owns (anything else in its schema is another application's).
TABLES: Final = frozenset({"xcore_meta", "events", "checkpoints", "snapshots", "archives"})

SCHEMA = """
CREATE TABLE IF NOT EXISTS xcore_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    position    BIGINT PRIMARY KEY,
    stream      TEXT NOT NULL,
    version     BIGINT NOT NULL,
    type        TEXT NOT NULL,
    schema      INTEGER NOT NULL,
    data        BYTEA NOT NULL,
    meta        BYTEA NOT NULL,
    id          TEXT NOT NULL,
    recorded_at DOUBLE PRECISION NOT NULL,
    UNIQUE (stream, version)
);
CREATE UNIQUE INDEX IF NOT EXISTS events_id ON events (id);
CREATE INDEX IF NOT EXISTS events_type ON events (type, position);
CREATE OR REPLACE FUNCTION xcore_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the xcore event log is append-only (% refused)', TG_OP;
END $$;
DROP TRIGGER IF EXISTS events_append_only ON events;
CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION xcore_append_only();
DROP TRIGGER IF EXISTS events_no_truncate ON events;
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION xcore_append_only();
CREATE TABLE IF NOT EXISTS checkpoints (
    scope TEXT NOT NULL, name TEXT NOT NULL, position BIGINT NOT NULL,
    PRIMARY KEY (scope, name)
);
CREATE TABLE IF NOT EXISTS snapshots (
    name TEXT PRIMARY KEY, position BIGINT NOT NULL, schema INTEGER NOT NULL,
    state BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS archives (
    digest TEXT PRIMARY KEY, name TEXT NOT NULL, size BIGINT NOT NULL,
    data BYTEA NOT NULL, stored_at DOUBLE PRECISION NOT NULL
);
"""

#: The functions the store creates in the log's schema.
FUNCTIONS: Final = ("xcore_append_only", "xcore_gapless", "xcore_append_v1")

#: Every INSERT into the log, ours or a foreign connection's, must continue it without a
#: gap: a row past the end (a hand-written position) would stop every node's follower,
#: which never skips a position. One check per statement (its rows, from a transition
#: table), under the ordering lock (re-entrant: our writer holds it already), so a foreign
#: insert also commits in position order. ``{key}`` is the schema's lock key.
GAPLESS_NAME: Final = "events_gapless"
GAPLESS: Final = """
CREATE OR REPLACE FUNCTION xcore_gapless() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    lo BIGINT;
    hi BIGINT;
    n BIGINT;
BEGIN
    PERFORM pg_advisory_xact_lock({key});
    SELECT min(position), max(position), count(*) INTO lo, hi, n FROM added;
    IF n > 0 AND (lo < 1 OR hi - lo + 1 <> n OR (lo > 1 AND NOT EXISTS (
            SELECT 1 FROM events WHERE position = lo - 1))) THEN
        RAISE EXCEPTION 'the xcore event log is gapless: positions % to % (% rows) do not '
            'continue it (append through xcore)', lo, hi, n
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS events_gapless ON events;
CREATE TRIGGER events_gapless AFTER INSERT ON events REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION xcore_gapless();
"""

#: Seconds any one statement may take before the store gives up on its connection (a
#: dead server, a network that drops packets silently): every connection (writer, pool,
#: listener) has it, so no call can wait forever. A timed-out write is retried on a new
#: connection (running a batch again is safe), then fails naming the server and the
#: operation.
COMMAND_TIMEOUT_S: Final = 60.0
#: Seconds the writer's transaction may sit idle between its statements before the
#: server ends the session (and releases the ordering lock it holds): see
#: ``PostgresWriter._settings``. Its statements follow each other within milliseconds.
IDLE_IN_TRANSACTION_S: Final = 10.0

#: Our statements are prepared once and run with id and stream arrays of every size: a
#: generic plan would scan the whole log for ``id = ANY($1)``; plan each run instead.
SERVER_SETTINGS: Final = {"plan_cache_mode": "force_custom_plan", "application_name": "xcore"}

UPSERT_CHECKPOINT = (
    "INSERT INTO checkpoints (scope, name, position) VALUES ($1, $2, $3)"
    " ON CONFLICT (scope, name) DO UPDATE SET position = excluded.position"
)
UPSERT_SNAPSHOT = (
    "INSERT INTO snapshots (name, position, schema, state) VALUES ($1, $2, $3, $4)"
    " ON CONFLICT (name) DO UPDATE SET position = excluded.position,"
    " schema = excluded.schema, state = excluded.state"
)


#: A query refused for what it was given (not for its connection).
REFUSED: Final = (asyncpg.PostgresError, asyncpg.DataError, ValueError, UnicodeError)


def _user_of(dsn: str) -> str:
    if "://" in dsn:
        return unquote(urlsplit(dsn).username or "") or "(default user)"
    for w in dsn.split():
        if w.lower().startswith("user="):
            return w.split("=", 1)[1]
    return "(default user)"


class Reconnecting(OSError):
    """A new connection failed for want of the server: retried like a lost one."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Unreachable(StoreError):
    """A new connection to the server failed for want of the server (not a refusal)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _explain(exc: BaseException, store: PostgresStore) -> str:
    """What a connection error means, in words (a timeout carries no message)."""
    if isinstance(exc, Reconnecting):
        return exc.reason
    if isinstance(exc, TimeoutError):
        return (
            f"the server did not answer within {store.command_timeout:g}s "
            "(command_timeout; a hung or unreachable server, or a lock held that long)"
        )
    return f"{type(exc).__name__}: {exc}"


async def _close(conn: asyncpg.Connection) -> None:
    try:
        await conn.close(timeout=5)
    except Exception:
        conn.terminate()


def _key(*parts: str) -> int:
    """A stable signed 64-bit advisory lock key."""
    digest = hashlib.blake2b("\x00".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class PostgresStore:
    """An event log in a PostgreSQL database, shared by every node that opens it."""

    def __init__(
        self,
        dsn: str,
        *,
        scope: str = "",
        max_batch: int = 10_000,
        tail_size: int = 8192,
        pool_size: int = 8,
        reconnect_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        command_timeout: float = COMMAND_TIMEOUT_S,
        idle_in_transaction_timeout: float = IDLE_IN_TRANSACTION_S,
    ) -> None:
        self.dsn = dsn
        self.location = redact_dsn(dsn)
        self.scope = scope
        self.max_batch = max_batch
        self.pool_size = pool_size
        self.reconnect_timeout = reconnect_timeout
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.idle_in_transaction_timeout = idle_in_transaction_timeout
        self._tail = Tail(tail_size)
        self._pool: asyncpg.Pool | None = None
        self._writer: PostgresWriter | None = None
        self._follower: Follower | None = None
        self._open = False
        #: the advisory lock that orders commits, and the NOTIFY channel (per schema)
        self.lock_key = 0
        self.channel = ""
        #: whether the log's schema has the one-trip append function (``open`` decides)
        self.fast_append = False
        #: stream_version calls waiting for the next query, and the task running them
        self._version_reads = VersionReads(
            self._versions,
            refused=REFUSED,
            refusal=lambda stream, e: StoreError(f"{self.location}: stream {stream!r}: {e}"),
            closed=lambda: StoreClosed(f"{self.location}: the event log is closed"),
            name="xcore-pg-versions",
        )

    # -- opening and closing -------------------------------------------------------

    async def connect(self, settings: dict[str, str] | None = None) -> asyncpg.Connection:
        """A new connection, with the failure explained (server, credentials, database)."""
        try:
            conn: asyncpg.Connection = await asyncpg.connect(
                self.dsn,
                timeout=self.connect_timeout,
                command_timeout=self.command_timeout,
                server_settings={**SERVER_SETTINGS, **(settings or {})},
            )
        except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError) as e:
            raise StoreError(
                f"PostgreSQL at {self.location} refused the credentials of user "
                f"{_user_of(self.dsn)!r}: {e}"
            ) from None
        except asyncpg.InvalidCatalogNameError as e:
            raise StoreError(
                f"PostgreSQL at {self.location}: {e} (create it first, e.g. `createdb`)"
            ) from None
        except (ValueError, asyncpg.ClientConfigurationError) as e:
            # (before the connection errors: a configuration error is an InterfaceError)
            raise StoreError(
                f"invalid PostgreSQL DSN {self.location}: {e} (expected "
                "postgresql://user:password@host:port/database, the password "
                "percent-encoded)"
            ) from None
        except CONNECTION_ERRORS as e:
            reason = (
                f"no answer within {self.connect_timeout:g}s (connect_timeout)"
                if isinstance(e, TimeoutError)
                else f"{type(e).__name__}: {e}"
            )
            raise Unreachable(
                f"cannot reach the PostgreSQL server of {self.location}: {reason}", reason
            ) from None
        return conn

    async def open(self) -> None:
        if self._open:
            return
        conn = await self.connect()
        try:
            schema = str(await conn.fetchval("SELECT current_schema()") or "")
            if not schema:
                raise StoreError(
                    f"PostgreSQL at {self.location}: no schema to create the log in "
                    "(the search_path names no existing schema)"
                )
            self.lock_key = _key("xcore-log", schema)
            self.channel = "xcore_" + hashlib.blake2b(schema.encode(), digest_size=6).hexdigest()
            await self._create_schema(conn, schema)
            last = int(await conn.fetchval("SELECT COALESCE(MAX(position), 0) FROM events"))
        except asyncpg.PostgresError as e:
            # e.g. a role that may not create tables in the schema
            raise StoreError(
                f"PostgreSQL at {self.location}: cannot create or read the log's tables: "
                f"{type(e).__name__}: {e}"
            ) from None
        except CONNECTION_ERRORS as e:
            raise StoreError(
                f"PostgreSQL at {self.location}: opening the log failed: {_explain(e, self)}"
            ) from None
        finally:
            await _close(conn)
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=1,
                max_size=self.pool_size,
                timeout=self.connect_timeout,
                command_timeout=self.command_timeout,
                server_settings=SERVER_SETTINGS,
            )
        except CONNECTION_ERRORS as e:
            raise StoreError(
                f"cannot reach the PostgreSQL server of {self.location}: {_explain(e, self)}"
            ) from None
        self._tail.reset(last)
        self._tail.closed = False
        self._writer = PostgresWriter(self, self._committed)
        self._follower = Follower(self, self._tail)
        try:
            await self._writer.start()
            await self._follower.start(last)
        except BaseException:
            await self._release()
            raise
        self._open = True

    async def _create_schema(self, conn: asyncpg.Connection, schema: str) -> None:
        async with conn.transaction():
            # nodes starting together create the tables once, one after the other
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _key("xcore-schema", schema))
            tables = {
                r[0]
                for r in await conn.fetch(
                    "SELECT table_name FROM information_schema.tables WHERE table_schema = $1",
                    schema,
                )
            }
            if tables and "xcore_meta" not in tables:
                raise StoreCorrupt(
                    f"PostgreSQL at {self.location}: schema {schema!r} belongs to another "
                    f"application (it holds {', '.join(sorted(tables)[:8])} and no xcore log); "
                    "give xcore an empty database or schema of its own"
                )
            if "xcore_meta" in tables:
                found = await conn.fetchval("SELECT value FROM xcore_meta WHERE key = 'format'")
                if found is None:
                    raise StoreCorrupt(
                        f"PostgreSQL at {self.location}: schema {schema!r} has an xcore_meta "
                        "table without a format record; it is not an xcore log"
                    )
                if int(found) > FORMAT:
                    raise StoreError(
                        f"PostgreSQL at {self.location} holds a log written by a newer xcore "
                        f"(log format {found}; this version reads format {FORMAT})"
                    )
                if tables >= TABLES:
                    await self._create_append_function(conn, schema)
                    await self._create_gapless_trigger(conn)
                    return
            if not tables:
                # a new log: any function of the names it creates is someone else's (the
                # store creates its tables and functions in one transaction)
                taken = await conn.fetch(
                    "SELECT DISTINCT p.proname FROM pg_proc p"
                    " JOIN pg_namespace n ON n.oid = p.pronamespace"
                    " WHERE n.nspname = $1 AND p.proname = ANY($2::text[]) ORDER BY 1",
                    schema,
                    list(FUNCTIONS),
                )
                if taken:
                    raise self._foreign_function(schema, taken[0][0])
            elif await self._append_function_state(conn, schema) == "foreign":
                raise self._foreign_function(schema)
            await conn.execute(SCHEMA)
            await conn.execute(GAPLESS.replace("{key}", str(int(self.lock_key))))
            await conn.execute(APPEND_FUNCTION)
            await conn.execute(
                f"COMMENT ON FUNCTION {APPEND_FUNCTION_NAME} IS '{APPEND_FUNCTION_MARK}'"
            )
            self.fast_append = True
            await conn.execute(
                "INSERT INTO xcore_meta (key, value) VALUES ('format', $1), "
                "('application', 'xcore') ON CONFLICT (key) DO NOTHING",
                str(FORMAT),
            )

    async def _create_gapless_trigger(self, conn: asyncpg.Connection) -> None:
        """Add the gapless check to a log created before it existed (once)."""
        found = await conn.fetchval(
            "SELECT count(*) FROM pg_trigger WHERE tgname = $1 AND tgrelid = 'events'::regclass",
            GAPLESS_NAME,
        )
        if found:
            return
        try:
            async with conn.transaction():  # a savepoint: the failure must not end ours
                await conn.execute(GAPLESS.replace("{key}", str(int(self.lock_key))))
        except asyncpg.InsufficientPrivilegeError as e:
            log.warning(
                "%s: cannot add the gapless check to the log (%s); a foreign insert past "
                "its end would stop every node's readers",
                self.location,
                e,
            )

    async def _create_append_function(self, conn: asyncpg.Connection, schema: str) -> None:
        """Add the one-trip append function to a log created before it existed.

        Optional: a role that may not create it gets the general path (several trips to
        the server per batch) and a warning, not an error.
        """
        state = await self._append_function_state(conn, schema)
        if state == "foreign":
            raise self._foreign_function(schema)
        mark = f"COMMENT ON FUNCTION {APPEND_FUNCTION_NAME} IS '{APPEND_FUNCTION_MARK}'"
        if state == "unmarked":  # ours by its body, created before the mark existed
            try:
                async with conn.transaction():  # a savepoint
                    await conn.execute(mark)
            except asyncpg.InsufficientPrivilegeError as e:
                log.info(
                    "%s: cannot mark %s as xcore's (%s)", self.location, APPEND_FUNCTION_NAME, e
                )
            state = "ours"
        if state == "ours":
            self.fast_append = True
            return
        try:
            async with conn.transaction():  # a savepoint: the failure must not end ours
                await conn.execute(APPEND_FUNCTION)
                await conn.execute(mark)
        except asyncpg.InsufficientPrivilegeError as e:
            log.warning(
                "%s: cannot create %s (%s); appends take several trips to the server",
                self.location,
                APPEND_FUNCTION_NAME,
                e,
            )
            return
        self.fast_append = True

    async def _append_function_state(self, conn: asyncpg.Connection, schema: str) -> str:
        """Whether the log's schema holds the append function: "missing", "ours" (it
        bears the store's mark), "unmarked" (ours by its body, created before the mark
        existed) or "foreign" (a function of that name that is not the store's)."""
        rows = await conn.fetch(
            "SELECT p.prosrc, obj_description(p.oid, 'pg_proc') FROM pg_proc p"
            " JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = $1 AND p.proname = $2",
            schema,
            APPEND_FUNCTION_NAME,
        )
        if not rows:
            return "missing"
        if len(rows) == 1:
            source, comment = rows[0]
            if comment == APPEND_FUNCTION_MARK and source == APPEND_FUNCTION_BODY:
                return "ours"
            if comment is None and source == APPEND_FUNCTION_BODY:
                return "unmarked"
        return "foreign"

    def _foreign_function(self, schema: str, name: str = APPEND_FUNCTION_NAME) -> StoreCorrupt:
        why = (
            f"it lacks the store's mark {APPEND_FUNCTION_MARK!r} or its body differs"
            if name == APPEND_FUNCTION_NAME
            else "the schema holds no xcore log yet"
        )
        return StoreCorrupt(
            f"PostgreSQL at {self.location}: schema {schema!r} holds a function {name} "
            f"that is not xcore's ({why}); xcore will neither call nor replace it: rename "
            "or drop it, or give xcore a schema of its own"
        )

    async def close(self) -> None:
        if not self._open:
            return
        self._open = False
        if self._writer is not None:
            await self._writer.stop()
        self._tail.close()
        await self._release()

    async def _release(self) -> None:
        await self._version_reads.close()
        if self._follower is not None:
            await self._follower.stop()
            self._follower = None
        if self._writer is not None:
            await self._writer.stop()
            self._writer = None
        if self._pool is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self._pool.close()
            self._pool.terminate()
            self._pool = None

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Healthy while open with a running writer; no I/O (see EventStore.health)."""
        details: dict[str, Any] = {"location": self.location}
        if not self._open:
            details["error"] = "the store is closed"
            return False, details
        return True, details

    def _check_open(self) -> None:
        if not self._open:
            raise StoreClosed(f"{self.location}: the event log is closed")

    def _committed(self, records: list[Row]) -> None:
        """The writer committed these rows: into the tail now if they follow it."""
        if self._follower is not None:
            self._follower.committed(records)

    async def retrying(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """Run ``op``, retrying with backoff while the server cannot be reached."""
        deadline = time.monotonic() + self.reconnect_timeout
        delay = 0.05
        while True:
            try:
                return await op()
            except CONNECTION_ERRORS as exc:
                if not self._open and self._pool is None:
                    raise StoreClosed(f"{self.location}: the event log is closed") from None
                if time.monotonic() + delay > deadline:
                    raise StoreError(
                        f"{self.location}: {what} failed, the server could not be reached "
                        f"for {self.reconnect_timeout:g}s: {_explain(exc, self)}"
                    ) from exc
                log.warning(
                    "%s: %s failed (%s); retrying in %.2fs",
                    self.location,
                    what,
                    _explain(exc, self),
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _fetch(self, sql: str, *args: Any, what: str = "read") -> list[asyncpg.Record]:
        async def op() -> list[asyncpg.Record]:
            pool = self._pool
            if pool is None:
                raise StoreClosed(f"{self.location}: the event log is closed")
            async with pool.acquire() as conn:
                return list(await conn.fetch(sql, *args))

        return await self.retrying(what, op)

    # -- writing -------------------------------------------------------------------

    async def append(
        self,
        events: Sequence[NewEvent],
        *,
        stream: str,
        expected_version: int | None = ANY,
    ) -> list[Recorded]:
        self._check_open()
        events = check_write(self.location, stream, events, expected_version)
        if not events:
            return []
        assert self._writer is not None
        return await self._writer.append(events, stream, expected_version)

    async def append_many(self, writes: Sequence[StreamWrite]) -> list[WriteResult]:
        self._check_open()
        assert self._writer is not None
        return await self._writer.append_many(writes)

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
        cached = self._tail.read(after, types, stream, limit)
        if cached is not None:
            return cached
        return await self.read_range(after, None, types=types, stream=stream, limit=limit)

    async def read_range(
        self,
        after: int,
        upto: int | None,
        *,
        types: Collection[str] | None = None,
        stream: str | None = None,
        limit: int | None = None,
    ) -> list[Recorded]:
        """Events with ``after < position <= upto`` from the database itself."""
        sql = f"SELECT {COLUMNS} FROM events WHERE position > $1"
        params: list[Any] = [after]
        if upto is not None:
            params.append(upto)
            sql += f" AND position <= ${len(params)}"
        if types is not None:
            if not types:
                return []
            params.append(list(types))
            sql += f" AND type = ANY(${len(params)}::text[])"
        if stream is not None:
            params.append(stream)
            sql += f" AND stream = ${len(params)}"
        sql += " ORDER BY position"
        if limit is not None:
            params.append(limit)
            sql += f" LIMIT ${len(params)}"
        rows = await self._fetch(sql, *params, what="reading events")
        return Recorded.from_rows(rows)

    async def read_rows(self, after: int, upto: int, limit: int) -> list[Row]:
        """Rows as stored (original schema and bytes), ``after < position <= upto``."""
        rows = await self._fetch(
            f"SELECT {COLUMNS} FROM events WHERE position > $1 AND position <= $2"
            " ORDER BY position LIMIT $3",
            after,
            upto,
            limit,
            what="reading events",
        )
        return [tuple(r) for r in rows]

    async def last_position(self) -> int:
        """The newest position this node has followed (its tail), not the server's.

        Readers pair it with :meth:`read` (a subscription skips past filtered-out events
        up to it), so it must never be ahead of what a read can return; the follower
        brings it to the server's last position within a notification.
        """
        self._check_open()
        return self._tail.last_position

    async def stream_version(self, stream: str) -> int:
        """The stream's current version, read after the call began.

        Concurrent calls share one query (a burst of claims reads its streams in one
        trip, not one each): a call waits for the next query to start, never for an
        answer read before it was made.
        """
        self._check_open()
        return await self._version_reads.get(stream)

    async def _versions(self, streams: list[str]) -> dict[str, int]:
        rows = await self._fetch(
            "SELECT stream, MAX(version) FROM events WHERE stream = ANY($1::text[])"
            " GROUP BY stream",
            streams,
            what="reading stream versions",
        )
        return {stream: int(version) for stream, version in rows}

    async def wait(self, after: int, timeout: float | None = None) -> int:
        self._check_open()
        return await self._tail.wait(after, timeout)

    # -- checkpoints and snapshots ---------------------------------------------------

    async def load_checkpoint(self, name: str) -> int | None:
        self._check_open()
        rows = await self._fetch(
            "SELECT position FROM checkpoints WHERE scope = $1 AND name = $2",
            self.scope,
            name,
            what=f"loading checkpoint {name!r}",
        )
        return int(rows[0][0]) if rows else None

    async def save_checkpoint(self, name: str, position: int) -> None:
        self._check_open()
        assert self._writer is not None
        await self._writer.put(UPSERT_CHECKPOINT, (self.scope, name, position))

    async def load_snapshot(self, name: str) -> Snapshot | None:
        self._check_open()
        rows = await self._fetch(
            "SELECT position, schema, state FROM snapshots WHERE name = $1",
            name,
            what=f"loading snapshot {name!r}",
        )
        if not rows:
            return None
        row = rows[0]
        return Snapshot(name=name, position=int(row[0]), schema=int(row[1]), state=bytes(row[2]))

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        self._check_open()
        assert self._writer is not None
        await self._writer.put(
            UPSERT_SNAPSHOT, (snapshot.name, snapshot.position, snapshot.schema, snapshot.state)
        )

    # -- content-addressed blobs (plugin archives of a cluster) ------------------------

    async def put_archive(self, digest: str, name: str, data: bytes) -> None:
        """Store ``data`` under ``digest`` (a no-op when it is already there)."""
        self._check_open()
        assert self._writer is not None
        await self._writer.put(
            "INSERT INTO archives (digest, name, size, data, stored_at)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (digest) DO NOTHING",
            (digest, name, len(data), data, time.time()),
        )

    async def get_archive(self, digest: str) -> bytes | None:
        self._check_open()
        rows = await self._fetch(
            "SELECT data FROM archives WHERE digest = $1", digest, what="reading an archive"
        )
        return bytes(rows[0][0]) if rows else None
