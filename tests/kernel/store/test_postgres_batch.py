"""The PostgreSQL writer's one-trip batch: a batch of appends is one statement, and a
batch whose assumptions do not hold (a version conflict, an id already stored, an id
twice) is decided by the general path exactly as before; an older log gets the function
on open, and a role that may not create it still writes."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
import pytest

from kernel.errors import ConcurrencyError
from kernel.events import Meta, NewEvent
from kernel.store.postgres import PostgresStore
from kernel.store.postgres_writer import APPEND_FUNCTION_NAME

pytestmark = pytest.mark.postgres


def raw(i: int, meta: Meta | None = None) -> NewEvent:
    event = NewEvent.raw("Noted", {"i": i}, meta)
    return dataclasses.replace(event, explicit_id=True) if meta is not None else event


class Statements:
    """The statements the writer's own connection sends (asyncpg's query logger)."""

    def __init__(self, store: PostgresStore) -> None:
        assert store._writer is not None and store._writer._conn is not None
        self.conn = store._writer._conn
        self.sent: list[str] = []
        self.conn.add_query_logger(self._log)

    def _log(self, record: Any) -> None:
        self.sent.append(record.query)

    def close(self) -> None:
        self.conn.remove_query_logger(self._log)


async def _function_count(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
                " WHERE n.nspname = current_schema() AND p.proname = $1",
                APPEND_FUNCTION_NAME,
            )
        )
    finally:
        await conn.close()


async def test_a_batch_of_appends_is_one_statement(pg_dsn: str) -> None:
    store = PostgresStore(pg_dsn)
    await store.open()
    try:
        with anyio.fail_after(60):
            await store.append([raw(0)], stream="warm")
            spy = Statements(store)
            async with anyio.create_task_group() as tg:
                for p in range(50):
                    tg.start_soon(lambda p=p: store.append([raw(p), raw(p)], stream=f"s{p % 7}"))
            spy.close()
            # one statement per batch, and no BEGIN/COMMIT around it
            assert spy.sent, "the writer sent nothing"
            assert all(APPEND_FUNCTION_NAME in q for q in spy.sent), spy.sent
            assert len(spy.sent) <= 50
            records = await store.read()
            assert [r.position for r in records] == list(range(1, 102))
            for p in range(7):
                versions = [r.version for r in records if r.stream == f"s{p}"]
                assert versions == list(range(1, len(versions) + 1))
    finally:
        await store.close()


async def test_conflicts_in_one_batch_are_decided_as_one_by_one(pg_dsn: str) -> None:
    store = PostgresStore(pg_dsn)
    await store.open()
    try:
        with anyio.fail_after(60):
            outcomes: dict[int, object] = {}

            async def claim(i: int) -> None:
                try:
                    outcomes[i] = await store.append([raw(i)], stream="x", expected_version=0)
                except ConcurrencyError as exc:
                    outcomes[i] = exc

            async def other(i: int) -> None:
                outcomes[100 + i] = await store.append([raw(i)], stream=f"o{i}")

            async with anyio.create_task_group() as tg:
                for i in range(5):
                    tg.start_soon(claim, i)
                    tg.start_soon(other, i)
            won = [i for i in range(5) if isinstance(outcomes[i], list)]
            assert len(won) == 1
            assert all(isinstance(outcomes[i], ConcurrencyError) for i in range(5) if i not in won)
            assert all(isinstance(outcomes[100 + i], list) for i in range(5))
            records = await store.read()
            assert [r.position for r in records] == list(range(1, 7))
            assert [r.version for r in records if r.stream == "x"] == [1]
    finally:
        await store.close()


async def test_expected_versions_are_checked_against_other_nodes_writes(pg_dsn: str) -> None:
    a, b = PostgresStore(pg_dsn, scope="a"), PostgresStore(pg_dsn, scope="b")
    await a.open()
    await b.open()
    try:
        with anyio.fail_after(60):
            await a.append([raw(1)], stream="s", expected_version=0)
            await b.append([raw(2)], stream="s", expected_version=1)
            # a has not seen b's append: its expectation is stale and must fail
            with pytest.raises(ConcurrencyError):
                await a.append([raw(3)], stream="s", expected_version=1)
            [r] = await a.append([raw(3)], stream="s", expected_version=2)
            assert (r.position, r.version) == (3, 3)
            assert [r.version for r in await b.read_range(0, None)] == [1, 2, 3]
    finally:
        await a.close()
        await b.close()


async def test_ids_already_stored_or_repeated_are_stored_once(pg_dsn: str) -> None:
    a, b = PostgresStore(pg_dsn, scope="a"), PostgresStore(pg_dsn, scope="b")
    await a.open()
    await b.open()
    try:
        with anyio.fail_after(60):
            meta = Meta()
            [first] = await a.append([raw(1, meta)], stream="s")
            # the same explicit id, through another node, alone and in a batch (a claim
            # another node won): answered from the log, and never under the general
            # path's lock (no BEGIN: the function's answer suffices)
            again = raw(1, meta)
            await b.append([raw(0)], stream="warm")
            spy = Statements(b)
            [alone] = await b.append([again], stream="s", expected_version=0)
            assert alone.position == first.position
            async with anyio.create_task_group() as tg:
                answers: list[Any] = []

                async def put(events: list[NewEvent], stream: str) -> None:
                    answers.append((stream, await b.append(events, stream=stream)))

                tg.start_soon(put, [again], "s")
                tg.start_soon(put, [raw(2)], "t")
            spy.close()
            assert spy.sent and all(APPEND_FUNCTION_NAME in q for q in spy.sent), spy.sent
            answered = dict(answers)
            assert [r.position for r in answered["s"]] == [first.position]
            # one event object twice in one append is stored once (as on the general path)
            twice = raw(3)
            stored = await b.append([twice, twice], stream="u")
            assert len(stored) == 1
            rows = await b.read_range(0, None)
            assert len({r.meta.id for r in rows}) == len(rows) == 4
            assert [r.position for r in rows] == [1, 2, 3, 4]
            # part of an append stored already: the general path stores the rest once
            half = [raw(4, Meta()), again]
            stored = await a.append(half, stream="v")
            assert [r.position for r in stored] == [5]
            assert len(await b.read_range(0, None)) == 5
    finally:
        await a.close()
        await b.close()


async def test_a_log_created_before_the_function_gets_it_on_open(pg_dsn: str) -> None:
    store = PostgresStore(pg_dsn)
    await store.open()
    await store.append([raw(1)], stream="s")
    await store.close()
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute(f"DROP FUNCTION {APPEND_FUNCTION_NAME}")
    finally:
        await admin.close()
    assert await _function_count(pg_dsn) == 0
    store = PostgresStore(pg_dsn)
    await store.open()
    try:
        with anyio.fail_after(30):
            assert store.fast_append
            assert await _function_count(pg_dsn) == 1
            [r] = await store.append([raw(2)], stream="s")
            assert (r.position, r.version) == (2, 2)
    finally:
        await store.close()


async def test_a_role_that_may_not_create_the_function_still_appends(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    schema = pg_dsn.rsplit("search_path=", 1)[1]
    store = PostgresStore(pg_dsn)
    await store.open()
    await store.close()
    admin = await asyncpg.connect(pg_dsn)
    role = f"w_{schema}"
    try:
        await admin.execute(f"DROP FUNCTION {APPEND_FUNCTION_NAME}")
        await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'writer-pw-123'")
        await admin.execute(f"GRANT USAGE ON SCHEMA {schema} TO {role}")
        await admin.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA {schema} TO {role}")
        parts = urlsplit(pg_dsn)
        host = parts.netloc.rpartition("@")[2]
        dsn = urlunsplit(parts._replace(netloc=f"{role}:writer-pw-123@{host}"))
        writer = PostgresStore(dsn)
        with caplog.at_level(logging.WARNING, logger="xcore.store"):
            await writer.open()
        try:
            with anyio.fail_after(30):
                assert not writer.fast_append
                assert APPEND_FUNCTION_NAME in caplog.text
                async with anyio.create_task_group() as tg:
                    for i in range(10):
                        tg.start_soon(lambda i=i: writer.append([raw(i)], stream=f"s{i % 3}"))
                assert [r.position for r in await writer.read()] == list(range(1, 11))
        finally:
            await writer.close()
    finally:
        await admin.execute(f"DROP OWNED BY {role}")
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()


async def test_concurrent_version_reads_share_one_query(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = PostgresStore(pg_dsn, scope="a"), PostgresStore(pg_dsn, scope="b")
    await a.open()
    await b.open()
    try:
        with anyio.fail_after(60):
            for i in range(20):
                await a.append([raw(j) for j in range(i)] or [raw(0)], stream=f"s{i}")
            queries: list[str] = []
            fetch = b._fetch

            async def counted(sql: str, *args: Any, what: str = "read") -> Any:
                queries.append(sql)
                return await fetch(sql, *args, what=what)

            monkeypatch.setattr(b, "_fetch", counted)
            got: dict[int, int] = {}

            async def read(k: int) -> None:
                got[k] = await b.stream_version(f"s{k % 25}")

            async with anyio.create_task_group() as tg:
                for k in range(200):
                    tg.start_soon(read, k)
            assert got == {k: (max(k % 25, 1) if k % 25 < 20 else 0) for k in range(200)}
            assert 1 <= len(queries) <= 3, len(queries)
            # a read made after another node's append sees it
            await a.append([raw(1)], stream="s3")
            assert await b.stream_version("s3") == 4
    finally:
        await a.close()
        await b.close()
