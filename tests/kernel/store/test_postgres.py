"""What the PostgreSQL store promises beyond the shared contract: several writing nodes,
wake-ups through LISTEN/NOTIFY, reconnection, append-only, clear errors."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import sys
import textwrap
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
import pytest

from kernel.errors import StoreCorrupt, StoreError
from kernel.events import NewEvent
from kernel.settings import Settings
from kernel.store.postgres import PostgresStore, redact_dsn

pytestmark = pytest.mark.postgres

WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from kernel.events import NewEvent
    from kernel.store.postgres import PostgresStore

    async def main(dsn, name, producers, each):
        store = PostgresStore(dsn)
        await store.open()
        async def produce(p):
            for i in range(each):
                await store.append(
                    [NewEvent.raw("Wrote", {"w": name, "p": p, "i": i})], stream=f"{name}-{p}"
                )
        await asyncio.gather(*(produce(p) for p in range(producers)))
        await store.close()

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
    """
)


def raw(i: int) -> NewEvent:
    return NewEvent.raw("Noted", {"i": i})


async def test_writers_in_several_processes_give_a_gapless_log_read_in_order(
    pg_dsn: str,
) -> None:
    reader = PostgresStore(pg_dsn)
    await reader.open()
    seen: list[int] = []
    writers, producers, each = 3, 8, 25
    total = writers * producers * each
    try:
        with anyio.fail_after(120):

            async def follow() -> None:
                # a live subscriber: wait for commits, read what follows, never skip
                after = 0
                while after < total:
                    await reader.wait(after, timeout=5)
                    for r in await reader.read(after=after):
                        seen.append(r.position)
                        after = r.position

            async with anyio.create_task_group() as tg:
                tg.start_soon(follow)
                async with anyio.create_task_group() as procs:
                    for w in range(writers):
                        procs.start_soon(
                            lambda w=w: anyio.run_process(
                                [
                                    sys.executable,
                                    "-c",
                                    WRITER,
                                    pg_dsn,
                                    f"w{w}",
                                    str(producers),
                                    str(each),
                                ],
                                stderr=None,
                            )
                        )
        assert seen == list(range(1, total + 1))
        records = await reader.read()
        for w in range(writers):
            for p in range(producers):
                versions = [r.version for r in records if r.stream == f"w{w}-{p}"]
                assert versions == list(range(1, each + 1))
    finally:
        await reader.close()


async def test_a_node_wakes_on_another_nodes_commit(pg_dsn: str) -> None:
    a, b = PostgresStore(pg_dsn, scope="a"), PostgresStore(pg_dsn, scope="b")
    await a.open()
    await b.open()
    try:
        with anyio.fail_after(30):
            for i in range(1, 6):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(lambda i=i: b.append([raw(i)], stream="s"))
                    # no timeout: only a notification can end this wait
                    assert await a.wait(i - 1) >= i
                [r] = await a.read(after=i - 1)
                assert r.data == {"i": i}
    finally:
        await a.close()
        await b.close()


async def test_lost_connections_are_reopened_and_nothing_is_missed(pg_dsn: str) -> None:
    a, b = PostgresStore(pg_dsn, scope="a"), PostgresStore(pg_dsn, scope="b")
    await a.open()
    await b.open()
    admin = await asyncpg.connect(pg_dsn)
    try:
        with anyio.fail_after(60):
            await b.append([raw(1)], stream="s")
            assert await a.wait(0) == 1
            assert a._follower is not None
            before = a._follower.reconnects
            # the server drops every connection of node a (listener, writer, pool)
            mine = await admin.fetchval("SELECT pg_backend_pid()")
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> $1",
                mine,
            )
            # b appends while a is reconnecting; a's subscriber still gets everything
            await b.append([raw(2), raw(3)], stream="s")
            assert await a.wait(1) >= 3 or await a.wait(1) >= 3
            assert [r.data["i"] for r in await a.read(after=1)] == [2, 3]
            # and a can write again
            [r] = await a.append([raw(4)], stream="s")
            assert r.position == 4
            while a._follower.reconnects == before:
                await anyio.sleep(0.05)
    finally:
        await admin.close()
        await a.close()
        await b.close()


async def test_the_log_is_append_only_in_the_database(pg_dsn: str) -> None:
    store = PostgresStore(pg_dsn)
    await store.open()
    await store.append([raw(1)], stream="s")
    await store.close()
    conn = await asyncpg.connect(pg_dsn)
    try:
        for sql in ("UPDATE events SET type = 'X'", "DELETE FROM events", "TRUNCATE events"):
            with pytest.raises(asyncpg.RaiseError, match="append-only"):
                await conn.execute(sql)
        assert await conn.fetchval("SELECT count(*) FROM events") == 1
        assert await conn.fetchval("SELECT value FROM xcore_meta WHERE key = 'format'") == "1"
    finally:
        await conn.close()


async def test_checkpoints_belong_to_their_node_and_snapshots_are_shared(pg_dsn: str) -> None:
    a, b = PostgresStore(pg_dsn, scope="a"), PostgresStore(pg_dsn, scope="b")
    await a.open()
    await b.open()
    try:
        await a.save_checkpoint("sub", 5)
        await b.save_checkpoint("sub", 9)
        assert await a.load_checkpoint("sub") == 5
        assert await b.load_checkpoint("sub") == 9
    finally:
        await a.close()
        await b.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _with_password(dsn: str, password: str) -> str:
    parts = urlsplit(dsn)
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


async def test_clear_errors_for_unreachable_server_and_bad_credentials(pg_dsn: str) -> None:
    with anyio.fail_after(60):
        dead = urlsplit(pg_dsn)._replace(netloc=f"u:secret-pw@127.0.0.1:{_free_port()}")
        with pytest.raises(StoreError, match="cannot reach the PostgreSQL server") as err:
            await PostgresStore(urlunsplit(dead), connect_timeout=5).open()
        assert "secret-pw" not in str(err.value)
        with pytest.raises(StoreError, match="refused the credentials of user") as err:
            await PostgresStore(_with_password(pg_dsn, "wrong-password")).open()
        assert "wrong-password" not in str(err.value)
        missing = urlsplit(pg_dsn)._replace(path="/no_such_database")
        with pytest.raises(StoreError, match="no_such_database"):
            await PostgresStore(urlunsplit(missing)).open()


async def test_a_schema_of_another_application_is_refused(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("CREATE TABLE customers (id int)")
    finally:
        await conn.close()
    with pytest.raises(StoreCorrupt, match="another application.*customers"):
        await PostgresStore(pg_dsn).open()


async def test_a_log_of_a_newer_format_is_refused(pg_dsn: str) -> None:
    store = PostgresStore(pg_dsn)
    await store.open()
    await store.close()
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("UPDATE xcore_meta SET value = '99' WHERE key = 'format'")
    finally:
        await conn.close()
    with pytest.raises(StoreError, match="newer xcore"):
        await PostgresStore(pg_dsn).open()


def test_the_password_is_redacted_in_locations_settings_and_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dsn = "postgresql://ada:s3cr3t-pw@db.example:5432/xcore"
    assert redact_dsn(dsn) == "postgresql://ada:***@db.example:5432/xcore"
    assert "pw9" not in redact_dsn("host=h user=u password=pw9 dbname=x")
    assert PostgresStore(dsn).location == "postgresql://ada:***@db.example:5432/xcore"
    settings = Settings.load(env={"XCORE_STORE": "postgres", "XCORE_DSN": dsn})
    assert "s3cr3t-pw" not in repr(settings) and "s3cr3t-pw" not in str(settings.model_dump())
    from kernel.logging import TextFormatter

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "dsn is %s", (dsn,), None)
    assert "s3cr3t-pw" not in TextFormatter().format(record)


async def test_a_filtered_subscription_misses_nothing_another_node_writes(pg_dsn: str) -> None:
    from kernel.subscriptions import Subscription

    a, b = PostgresStore(pg_dsn, scope="a"), PostgresStore(pg_dsn, scope="b")
    await a.open()
    await b.open()
    got: list[int] = []
    sub = Subscription(a, lambda r: got.append(r.data["i"]), types=["Wanted"], start=0)
    await sub.start()
    try:
        with anyio.fail_after(60):

            async def produce(p: int) -> None:
                for i in range(30):
                    n = p * 100 + i
                    await b.append(
                        [NewEvent.raw("Other", {"i": n}), NewEvent.raw("Wanted", {"i": n})],
                        stream=f"p{p}",
                    )

            async with anyio.create_task_group() as tg:
                for p in range(5):
                    tg.start_soon(produce, p)
            while len(got) < 150:
                await anyio.sleep(0.02)
        assert sorted(got) == sorted(p * 100 + i for p in range(5) for i in range(30))
        assert len(got) == 150
    finally:
        await sub.stop()
        await a.close()
        await b.close()


async def test_last_position_never_runs_ahead_of_what_a_read_returns(pg_dsn: str) -> None:
    # a subscription skips past filtered-out events up to last_position(): if that were
    # the server's position while reads come from a tail that lags, events would be lost
    a, b = PostgresStore(pg_dsn, scope="a"), PostgresStore(pg_dsn, scope="b")
    await a.open()
    await b.open()
    try:
        with anyio.fail_after(60):
            for i in range(30):
                await b.append([raw(i)], stream="s")
                last = await a.last_position()
                seen = [r.position for r in await a.read(after=0)]
                assert seen == list(range(1, last + 1))
    finally:
        await a.close()
        await b.close()


async def test_an_append_the_server_refuses_fails_alone(pg_dsn: str) -> None:
    store = PostgresStore(pg_dsn)
    await store.open()
    try:
        with anyio.fail_after(30):
            results: dict[str, object] = {}

            async def put(stream: str) -> None:
                try:
                    results[stream] = await store.append([raw(1)], stream=stream)
                except StoreError as exc:
                    results[stream] = exc

            # all three join one batch; PostgreSQL text cannot hold a NUL byte
            async with anyio.create_task_group() as tg:
                for stream in ("good-1", "bad\x00stream", "good-2"):
                    tg.start_soon(put, stream)
            assert isinstance(results["bad\x00stream"], StoreError)
            assert "nothing was written" in str(results["bad\x00stream"])
            assert not isinstance(results["good-1"], BaseException)
            assert not isinstance(results["good-2"], BaseException)
            assert sorted(r.stream for r in await store.read()) == ["good-1", "good-2"]
            # and the store goes on
            await store.append([raw(2)], stream="after")
    finally:
        await store.close()


async def test_nodes_starting_together_create_the_schema_once(pg_dsn: str) -> None:
    stores = [PostgresStore(pg_dsn, scope=f"n{i}") for i in range(5)]
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for s in stores:
                tg.start_soon(s.open)
        try:
            for i, s in enumerate(stores):
                await s.append([raw(i)], stream="s")
            while await stores[0].wait(4) < 5:  # the last one came from another node
                pass
            assert [r.version for r in await stores[0].read()] == [1, 2, 3, 4, 5]
        finally:
            for s in stores:
                await s.close()


async def test_a_role_that_may_not_create_tables_gets_a_clear_error(pg_dsn: str) -> None:
    schema = pg_dsn.rsplit("search_path=", 1)[1]
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute("DROP ROLE IF EXISTS xcore_reader")
        await admin.execute("CREATE ROLE xcore_reader LOGIN PASSWORD 'reader-pw-123'")
        await admin.execute(f"GRANT USAGE ON SCHEMA {schema} TO xcore_reader")
        parts = urlsplit(pg_dsn)
        host = parts.netloc.rpartition("@")[2]
        dsn = urlunsplit(parts._replace(netloc=f"xcore_reader:reader-pw-123@{host}"))
        with pytest.raises(StoreError, match="cannot create or read the log's tables") as err:
            await PostgresStore(dsn).open()
        assert "reader-pw-123" not in str(err.value)
    finally:
        await admin.execute(f"REVOKE ALL ON SCHEMA {schema} FROM xcore_reader")
        await admin.execute("DROP ROLE IF EXISTS xcore_reader")
        await admin.close()


ODD_DSNS = [
    # unencoded '/', '#', '?' or '@' in the password: a URL parser reads a host and port
    "postgresql://ada:pa/ss#Secret9?x@127.0.0.1:1/xcore",
    "postgresql://ada:p@ss/Secret9@127.0.0.1:1/xcore",
    "postgresql://ada:p?Secret9=1@127.0.0.1:1/xcore",
    # libpq's key=value form (which asyncpg refuses), the password quoted with spaces
    "host=127.0.0.1 user=ada password='pa Secret9 x' dbname=xcore",
    "host=127.0.0.1 user=ada password = Secret9 dbname=xcore",
    "postgresql://ada@127.0.0.1:1/xcore?sslmode=disable&PASSWORD=Secret9",
]


@pytest.mark.parametrize("dsn", ODD_DSNS)
async def test_an_oddly_written_password_never_shows(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert "Secret9" not in redact_dsn(dsn)
    store = PostgresStore(dsn, connect_timeout=5)
    assert "Secret9" not in store.location
    with anyio.fail_after(30), pytest.raises(StoreError) as caught:
        await store.open()
    assert "Secret9" not in str(caught.value)
    settings = Settings.load(env={"XCORE_STORE": "postgres", "XCORE_DSN": dsn})
    assert "Secret9" not in repr(settings) and "Secret9" not in str(settings.model_dump())
    from kernel.logging import TextFormatter

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "dsn is %s", (dsn,), None)
    assert "Secret9" not in TextFormatter().format(record)


COPY_ROW = (
    "INSERT INTO events (position, stream, version, type, schema, data, meta, id, recorded_at)"
    " SELECT {position}, stream, 50, type, schema, data, meta, {id}, recorded_at"
    " FROM events WHERE position = 1{conflict}"
)


async def test_a_foreign_insert_must_continue_the_log_without_a_gap(pg_dsn: str) -> None:
    """A hand-written row past the end of the log stopped every node's readers for good
    (a follower never skips a position); a reused position or id, or an upsert, is refused
    too; a foreign row that continues the log reaches the live readers."""
    store = PostgresStore(pg_dsn)
    await store.open()
    conn = await asyncpg.connect(pg_dsn)
    try:
        with anyio.fail_after(60):
            await store.append([raw(1), raw(2)], stream="s")
            for position, id_, error in (
                (10, "'far'", asyncpg.IntegrityConstraintViolationError),
                (0, "'zero'", asyncpg.IntegrityConstraintViolationError),
                (1, "'again'", asyncpg.UniqueViolationError),
                (3, "id", asyncpg.UniqueViolationError),
            ):
                with pytest.raises(error):
                    await conn.execute(COPY_ROW.format(position=position, id=id_, conflict=""))
            with pytest.raises(asyncpg.RaiseError, match="append-only"):
                await conn.execute(
                    COPY_ROW.format(
                        position=1,
                        id="'up'",
                        conflict=" ON CONFLICT (position) DO UPDATE SET type = 'Forged'",
                    )
                )
            assert await conn.fetchval("SELECT max(position) FROM events") == 2
            # the readers go on
            await store.append([raw(3)], stream="s")
            await conn.execute(COPY_ROW.format(position=4, id="'next'", conflict=""))
            await store.append([raw(5)], stream="s")
            seen: list[int] = []
            after = 0
            while len(seen) < 5:
                for e in await store.read(after=after):
                    seen.append(e.position)
                    after = e.position
                if len(seen) < 5:
                    await store.wait(after, 5)
            assert seen == [1, 2, 3, 4, 5]
    finally:
        await conn.close()
        await store.close()


async def test_a_log_created_before_the_gapless_check_gets_it_on_open(pg_dsn: str) -> None:
    store = PostgresStore(pg_dsn)
    await store.open()
    await store.append([raw(1)], stream="s")
    await store.close()
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("DROP TRIGGER events_gapless ON events")
        await store.open()
        await store.close()
        with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="gapless"):
            await conn.execute(COPY_ROW.format(position=7, id="'far'", conflict=""))
    finally:
        await conn.close()


async def test_a_listener_connection_that_hangs_without_a_word_is_replaced(
    pg_dsn: str,
) -> None:
    """A connection can die silently (a NAT forgetting it, a hung server process): no
    error comes, and the node waited for notifications forever. Here the server process
    behind the listener is stopped (SIGSTOP): the probe takes it for dead, a new listener
    replaces it and the subscriber gets what another node wrote meanwhile."""
    import os
    import signal

    from kernel.store.postgres_follow import LISTENER_NAME

    a = PostgresStore(pg_dsn, scope="a")
    await a.open()
    admin = await asyncpg.connect(pg_dsn)
    b = PostgresStore(pg_dsn, scope="b")
    stopped: list[int] = []
    try:
        with anyio.fail_after(90):
            [pid] = [
                r[0]
                for r in await admin.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = $1"
                    " AND datname = current_database()",
                    LISTENER_NAME,
                )
            ]
            await b.open()
            assert a._follower is not None
            before = a._follower.reconnects
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
            await b.append([raw(1), raw(2)], stream="s")
            assert await a.wait(0, 80) == 2
            assert [r.data["i"] for r in await a.read()] == [1, 2]
            assert a._follower.reconnects > before
            # the new listener wakes it as before
            await b.append([raw(3)], stream="s")
            assert await a.wait(2, 60) == 3
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        await admin.close()
        await a.close()
        await b.close()


async def test_a_follower_stopped_as_a_notification_arrives_stops(pg_dsn: str) -> None:
    """A notification wakes the listener's probe at the moment the store closes: the
    probe's wait swallowed the cancellation (Python 3.11's wait_for) and went on probing
    forever, so closing the store hung (found as a hang of this file after a merge)."""
    store = PostgresStore(pg_dsn)
    await store.open()
    try:
        with anyio.fail_after(60):
            follower = store._follower
            assert follower is not None
            tasks = list(follower._tasks)
            await anyio.sleep(0.1)  # the probe waits for a notification now
            follower._heard.set()  # a notification's wake-up is scheduled...
            await follower.stop()  # ...and the cancellation right after it
            assert all(t.done() for t in tasks)
            assert follower._listener is None
    finally:
        await store.close()


class SilentNetwork:
    """A TCP relay to the server that can go silent: bytes stop flowing both ways and
    new connections are accepted but never answered, while no socket is closed (a
    network that drops packets, a NAT that forgot the connection, a server host that
    froze). No error ever reaches the client: only a timeout can end its wait."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.silent = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> SilentNetwork:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        if self.silent:
            await reader.read()  # swallow everything, answer nothing
            return
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers.append(up_writer)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                if not self.silent:
                    dst.write(data)
                    await dst.drain()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_a_server_that_stops_answering_fails_calls_clearly_instead_of_hanging(
    pg_dsn: str,
) -> None:
    """Every connection (writer, pool, listener) has a command timeout: without one, an
    append or a read on a server that went silent waited forever. The error names the
    server and the operation; closing the store does not hang either."""
    parts = urlsplit(pg_dsn)
    assert parts.hostname is not None and parts.port is not None
    async with SilentNetwork(parts.hostname, parts.port) as net:
        netloc = parts.netloc.rpartition("@")[0] + f"@127.0.0.1:{net.port}"
        dsn = urlunsplit(parts._replace(netloc=netloc))
        # (not shorter: the machine running the tests may be loaded)
        store = PostgresStore(dsn, command_timeout=2, connect_timeout=2, reconnect_timeout=3)
        await store.open()
        try:
            with anyio.fail_after(90):
                await store.append([raw(1)], stream="s")
                await store.save_checkpoint("sub", 1)
                net.silent = True
                with pytest.raises(StoreError, match="append failed") as err:
                    await store.append([raw(2)], stream="s")
                assert f"127.0.0.1:{net.port}" in str(err.value)
                assert re.search(r"(did not answer|no answer) within 2s", str(err.value))
                with pytest.raises(StoreError, match="loading checkpoint 'sub' failed"):
                    await store.load_checkpoint("sub")
                with pytest.raises(StoreError, match="reading events failed"):
                    await store.read_range(0, None)
        finally:
            with anyio.fail_after(60):
                await store.close()


FOREIGN_APPEND = """
CREATE FUNCTION xcore_append_v1(
    lock_key BIGINT, channel TEXT, now DOUBLE PRECISION, streams TEXT[], check_ids TEXT[],
    check_stream INT[], check_base BIGINT[], ev_stream INT[], ev_off BIGINT[],
    ev_type TEXT[], ev_schema INT[], ev_data BYTEA[], ev_meta BYTEA[], ev_id TEXT[],
    OUT heads BIGINT[], OUT existing TEXT[]
) LANGUAGE sql AS $$ SELECT ARRAY[0::bigint], NULL::text[] $$
"""


async def test_a_users_function_named_like_the_stores_is_neither_called_nor_replaced(
    pg_dsn: str,
) -> None:
    """A function of the user's called xcore_append_v1 in the log's schema was taken for
    the store's own: on a new log it was silently replaced, on an existing one every
    append called it (here it would have 'committed' nothing and answered success)."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        # an empty schema but for the user's function
        await conn.execute(FOREIGN_APPEND)
        with pytest.raises(StoreCorrupt, match="xcore_append_v1 that is not xcore's"):
            await PostgresStore(pg_dsn).open()
        assert "SELECT ARRAY[0::bigint]" in await conn.fetchval(
            "SELECT prosrc FROM pg_proc WHERE proname = 'xcore_append_v1'"
            " AND pronamespace = current_schema()::regnamespace"
        )
        assert not await conn.fetchval(
            "SELECT count(*) FROM pg_tables WHERE tablename = 'events'"
            " AND schemaname = current_schema()"
        )
        # an existing log whose function was replaced by the user's
        await conn.execute("DROP FUNCTION xcore_append_v1")
        store = PostgresStore(pg_dsn)
        await store.open()
        await store.append([raw(1)], stream="s")
        await store.close()
        await conn.execute("DROP FUNCTION xcore_append_v1")
        await conn.execute(FOREIGN_APPEND)
        with pytest.raises(StoreCorrupt, match="xcore_append_v1 that is not xcore's"):
            await PostgresStore(pg_dsn).open()
        # a log created before the mark existed: its function is recognized and marked
        await conn.execute("DROP FUNCTION xcore_append_v1")
        await store.open()
        await store.close()
        await conn.execute("COMMENT ON FUNCTION xcore_append_v1 IS NULL")
        await store.open()
        try:
            assert store.fast_append
            [r] = await store.append([raw(2)], stream="s")
            assert r.position == 2
        finally:
            await store.close()
        assert await conn.fetchval(
            "SELECT obj_description(oid, 'pg_proc') FROM pg_proc WHERE proname = 'xcore_append_v1'"
            " AND pronamespace = current_schema()::regnamespace"
        )
    finally:
        await conn.close()


async def test_a_node_frozen_inside_its_transaction_does_not_stop_the_others(
    pg_dsn: str,
) -> None:
    """A node frozen between two statements of its write transaction (a stopped process,
    a paused VM) held the ordering lock, and every other node's appends waited for it to
    wake up. Here node a's writer connection is left inside a transaction holding the
    lock, as a frozen node's would be: the server ends that session after
    ``idle_in_transaction_timeout``, b's append goes through, and a writes again."""
    a = PostgresStore(pg_dsn, scope="a", idle_in_transaction_timeout=1)
    b = PostgresStore(pg_dsn, scope="b")
    await a.open()
    await b.open()
    try:
        with anyio.fail_after(45):
            assert a._writer is not None and a._writer._conn is not None
            await a._writer._conn.execute(f"BEGIN; SELECT pg_advisory_xact_lock({a.lock_key})")
            [r] = await b.append([raw(1)], stream="s")
            assert r.position == 1
            [r] = await a.append([raw(2)], stream="s")
            assert r.position == 2
    finally:
        await a.close()
        await b.close()


async def test_a_new_log_replaces_no_function_of_the_user(pg_dsn: str) -> None:
    """The store's trigger functions were created with CREATE OR REPLACE: in a schema
    holding a user's function of one of their names, a new log silently replaced it."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(
            "CREATE FUNCTION xcore_gapless() RETURNS trigger LANGUAGE plpgsql"
            " AS $$ BEGIN RETURN NULL; END $$"
        )
        with pytest.raises(StoreCorrupt, match="function xcore_gapless that is not xcore's"):
            await PostgresStore(pg_dsn).open()
        assert "BEGIN RETURN NULL; END" in await conn.fetchval(
            "SELECT prosrc FROM pg_proc WHERE proname = 'xcore_gapless'"
            " AND pronamespace = current_schema()::regnamespace"
        )
    finally:
        await conn.close()
