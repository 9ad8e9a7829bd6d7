"""The SQLite writer's mechanisms, each checked so that breaking it fails a test.

Durability setting, commit before answer, one transaction per batch (group commit),
rollback of a failed batch, isolation of one caller's bad data, StoreClosed during close,
and the byte bound of the in-memory tail.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from kernel.errors import StoreClosed, StoreError
from kernel.events import Meta, NewEvent
from kernel.store import NO_STREAM, SQLiteStore, StreamWrite, sqlite_writer


def is_commit(store: SQLiteStore, statement: str) -> bool:
    """Whether the traced ``statement`` of the writer's connection commits: a COMMIT,
    or an INSERT run in autocommit mode (a lone append's, its own transaction)."""
    assert store._write_conn is not None
    head = statement.strip().upper()
    if head.startswith("COMMIT"):
        return True
    raw = store._write_conn._conn  # type: ignore[attr-defined]
    return head.startswith("INSERT INTO EVENTS") and not raw.in_transaction


def ev(i: int, meta: Meta | None = None) -> NewEvent:
    return NewEvent.raw("Counted", {"i": i}, meta)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "log.db")
    await s.open()
    yield s
    await s.close()


async def test_the_write_connection_syncs_fully_by_default(store: SQLiteStore) -> None:
    assert store._write_conn is not None
    row = await (await store._write_conn.execute("PRAGMA synchronous")).fetchone()
    assert row is not None and row[0] == 2  # FULL
    mode = await (await store._write_conn.execute("PRAGMA journal_mode")).fetchone()
    assert mode is not None and mode[0] == "wal"


async def test_an_append_is_answered_only_after_its_commit(tmp_path: Path) -> None:
    """The commit is held in the connection's thread: while it is held, the appender
    must still be waiting; it is answered once the commit went through."""
    store = SQLiteStore(tmp_path / "log.db", inline_limit=0)  # commits in the thread
    await store.open()
    try:
        await _answered_after_commit(store)
    finally:
        await store.close()


async def test_a_lone_append_committed_inline_is_answered_after_its_commit(
    store: SQLiteStore,
) -> None:
    """Committed in the loop's own thread, the append is still waiting at its commit."""
    assert store._write_conn is not None
    seen: list[bool] = []
    tasks: list[asyncio.Task[object]] = []

    def trace(statement: str) -> None:
        if is_commit(store, statement):
            seen.append(threading.get_ident() == loop_thread and not tasks[0].done())

    loop_thread = threading.get_ident()
    await store._write_conn.set_trace_callback(trace)
    try:
        tasks.append(asyncio.create_task(store.append([ev(1)], stream="s")))
        with anyio.fail_after(20):
            [r] = await tasks[0]  # type: ignore[misc]
    finally:
        await store._write_conn.set_trace_callback(None)
    assert seen == [True]
    assert r.position == 1


async def _answered_after_commit(store: SQLiteStore) -> None:
    assert store._write_conn is not None
    in_commit = threading.Event()
    release = threading.Event()

    def trace(statement: str) -> None:
        if is_commit(store, statement):
            in_commit.set()
            release.wait(30)

    await store._write_conn.set_trace_callback(trace)
    try:
        task = asyncio.create_task(store.append([ev(1)], stream="s"))
        with anyio.fail_after(20):
            while not in_commit.is_set():
                await asyncio.sleep(0.005)
        for _ in range(20):  # give a wrongly early answer every chance to arrive
            await asyncio.sleep(0.005)
        assert not task.done(), "the append was answered before its commit"
        release.set()
        with anyio.fail_after(20):
            [r] = await task
        assert r.position == 1
    finally:
        release.set()
        await store._write_conn.set_trace_callback(None)


async def test_concurrent_appends_share_transactions(store: SQLiteStore) -> None:
    assert store._write_conn is not None
    commits: list[str] = []
    await store._write_conn.set_trace_callback(
        lambda s: commits.append(s) if is_commit(store, s) else None
    )
    with anyio.fail_after(30):
        await asyncio.gather(*(store.append([ev(i)], stream=f"p{i}") for i in range(100)))
    await store._write_conn.set_trace_callback(None)
    assert await store.last_position() == 100
    # the first append may commit alone; the 99 queued behind it join one batch
    assert 1 <= len(commits) <= 5, f"{len(commits)} commits for 100 concurrent appends"


async def test_append_many_commits_its_streams_in_one_transaction(store: SQLiteStore) -> None:
    assert store._write_conn is not None
    await store.append([ev(0)], stream="warm")  # the first write of a log may go alone
    commits: list[str] = []
    await store._write_conn.set_trace_callback(
        lambda s: commits.append(s) if is_commit(store, s) else None
    )
    with anyio.fail_after(30):
        answers = await store.append_many(
            [StreamWrite(f"p{i}", [ev(i)], NO_STREAM) for i in range(100)]
        )
    await store._write_conn.set_trace_callback(None)
    assert [a[0].version for a in answers if not isinstance(a, StoreError)] == [1] * 100
    assert len(commits) == 1, f"{len(commits)} commits for one append_many of 100 streams"


async def test_a_bad_append_fails_alone_and_its_rows_are_rolled_back(
    store: SQLiteStore,
) -> None:
    """An id already in the log, given with the plain constructor (not checked for
    idempotency), breaks a constraint: only its caller fails, and nothing of it stays
    in the open transaction to be committed with a later batch."""
    [first] = await store.append([ev(0)], stream="s")
    dup = NewEvent(type="Counted", data=b'{"i": -1}', meta=Meta(id=first.meta.id))
    # the first append fills more than one INSERT statement, so the failing statement
    # is not the only one of the transaction: only a rollback undoes the others
    results = await asyncio.gather(
        store.append([ev(1) for _ in range(600)], stream="a"),
        store.append([ev(2), dup], stream="b"),
        store.append([ev(3)], stream="c"),
        return_exceptions=True,
    )
    ok_a, bad, ok_c = results
    assert isinstance(bad, StoreError), bad
    assert not isinstance(ok_a, BaseException) and not isinstance(ok_c, BaseException)
    # a later batch commits; the refused append's first event must not ride along
    await store.append([ev(4)], stream="d")
    stored = [(r.stream, r.data["i"]) for r in await store.read()]
    assert stored == [("s", 0)] + [("a", 1)] * 600 + [("c", 3), ("d", 4)]
    assert [r.position for r in await store.read()] == list(range(1, 604))


async def test_a_payload_that_is_not_json_fails_only_its_caller(store: SQLiteStore) -> None:
    broken = NewEvent(type="Counted", data=b"{not json", meta=Meta())
    good, bad = await asyncio.gather(
        store.append([ev(1)], stream="a"),
        store.append([broken], stream="b"),
        return_exceptions=True,
    )
    assert isinstance(bad, StoreError) and "not JSON" in str(bad)
    assert not isinstance(good, BaseException)
    assert [r.data["i"] for r in await store.read()] == [1]


async def test_appends_during_and_after_close_get_store_closed(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "log.db")
    await store.open()
    queued = [asyncio.create_task(store.append([ev(i)], stream="s")) for i in range(20)]
    await asyncio.sleep(0)
    closing = asyncio.create_task(store.close())
    await asyncio.sleep(0)
    late = asyncio.create_task(store.append([ev(99)], stream="s"))
    with anyio.fail_after(20):
        await closing
        results = await asyncio.gather(*queued, late, return_exceptions=True)
    assert isinstance(results[-1], StoreClosed)
    # what was queued before close() committed, and was answered either way
    assert all(not isinstance(r, BaseException) or isinstance(r, StoreClosed) for r in results)
    with pytest.raises(StoreClosed):
        await store.append([ev(100)], stream="s")
    reopened = SQLiteStore(tmp_path / "log.db")
    await reopened.open()
    acked = sum(1 for r in results if not isinstance(r, BaseException))
    assert await reopened.last_position() == acked
    await reopened.close()


async def test_the_tail_is_bounded_by_bytes(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "log.db", tail_size=8192, tail_bytes=256 * 1024)
    await store.open()
    try:
        blob = "x" * 32 * 1024
        for _ in range(4):
            await store.append([NewEvent.raw("Big", {"b": blob}) for _ in range(16)], stream="s")
        tail = store._tail
        assert tail.bytes <= 256 * 1024
        assert 0 < len(tail._rows) < 64
        # a reader behind what the tail holds still gets everything, from the file
        assert len(await store.read(after=0)) == 64
    finally:
        await store.close()


async def test_records_are_private_to_each_reader(tmp_path: Path) -> None:
    """A subscriber that mutates ``r.data`` changes nothing the appender or other
    readers see (records from the tail are decoded for each reader)."""
    store = SQLiteStore(tmp_path / "log.db")
    await store.open()
    try:
        [mine] = await store.append([NewEvent.raw("Listed", {"items": [1]})], stream="s")
        [a] = await store.read()
        [b] = await store.read()
        a.data["items"].append(2)
        a.data["new"] = True
        assert b.data == {"items": [1]}
        assert mine.data == {"items": [1]}
        [c] = await store.read()
        assert c.data == {"items": [1]}
    finally:
        await store.close()


async def test_insert_or_replace_cannot_rewrite_an_event(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    store = SQLiteStore(path)
    await store.open()
    [r] = await store.append([ev(1)], stream="s")
    await store.close()
    conn = sqlite3.connect(path)
    try:
        for sql, params in [
            # same position
            (
                "INSERT OR REPLACE INTO events VALUES (1, 's', 1, 'Forged', 1, '{}', '{}', 'x', 0)",
                (),
            ),
            # same id, new position
            (
                "INSERT OR REPLACE INTO events VALUES (9, 'z', 1, 'Forged', 1, '{}', '{}', ?, 0)",
                (r.meta.id,),
            ),
            # same stream and version, new position
            (
                "INSERT OR REPLACE INTO events VALUES (9, 's', 1, 'Forged', 1, '{}', '{}', 'y', 0)",
                (),
            ),
            ("REPLACE INTO events VALUES (1, 's', 1, 'Forged', 1, '{}', '{}', 'x', 0)", ()),
        ]:
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                conn.execute(sql, params)
        conn.commit()
    finally:
        conn.close()
    again = SQLiteStore(path)
    await again.open()
    [back] = await again.read()
    await again.close()
    assert (back.type, back.meta.id) == ("Counted", r.meta.id)


async def test_appends_go_on_after_rows_another_process_inserted(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    store = SQLiteStore(path)
    await store.open()
    try:
        await store.append([ev(0), ev(1)], stream="s")
        got: list[int] = []

        async def follow() -> None:
            after = 0
            while after < 5:
                after = await store.wait(after, timeout=1)
                got.extend(r.position for r in await store.read(after=len(got)))

        # a foreign sqlite3 connection (not xcore's writer) appends a row of its own
        conn = sqlite3.connect(path)
        conn.execute(
            "INSERT INTO events VALUES (3, 's', 3, 'Counted', 1, '{}', '{}', 'foreign-id', 0)"
        )
        conn.commit()
        conn.close()
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(follow)
                await asyncio.sleep(0)
                # the writer takes the log as it now is instead of refusing forever
                recorded = await store.append([ev(2)], stream="s", expected_version=3)
                assert (recorded[0].position, recorded[0].version) == (4, 4)
                recorded = await store.append([ev(3)], stream="s")
                assert (recorded[0].position, recorded[0].version) == (5, 5)
        assert [r.position for r in await store.read(stream="s")] == [1, 2, 3, 4, 5]
        assert got == [1, 2, 3, 4, 5]  # a follower misses none of them
        assert store.health()[0]
    finally:
        await store.close()


async def test_reads_racing_close_get_store_closed_and_the_close_stays_clean(
    tmp_path: Path,
) -> None:
    path = tmp_path / "log.db"
    store = SQLiteStore(path)
    await store.open()
    await store.append([ev(i) for i in range(5)], stream="s")

    started = asyncio.Event()

    async def reads(i: int) -> str:
        try:
            while True:  # until close() stops it: some read is always in flight
                await store.read(stream="s", after=-1)  # not from the tail: from the file
                await store.stream_version(f"unseen-{i}")
                await store.load_checkpoint("cp")
                await store.load_snapshot("snap")
                started.set()
        except StoreClosed:
            return "closed"

    with anyio.fail_after(30):
        tasks = [asyncio.create_task(reads(i)) for i in range(50)]
        await started.wait()
        await store.close()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results == ["closed"] * 50  # no other error
    # no read held the log open past close: it was checkpointed and marked clean
    reopened = SQLiteStore(path)
    await reopened.open()
    try:
        assert reopened.recovery is None
        assert not (tmp_path / "log.db-wal.unclean").exists()
    finally:
        await reopened.close()


async def _statement_threads(store: SQLiteStore, producers: int) -> set[int]:
    """The threads that ran the writer's INSERTs while ``producers`` appended at once."""
    assert store._write_conn is not None
    threads: set[int] = set()

    def trace(sql: str) -> None:
        if sql.startswith("INSERT INTO events"):
            threads.add(threading.get_ident())

    raw = store._write_conn._conn  # type: ignore[attr-defined]
    await store._write_conn._execute(raw.set_trace_callback, trace)  # type: ignore[attr-defined]
    try:
        await asyncio.gather(*(store.append([ev(i)], stream=f"p{i}") for i in range(producers)))
    finally:
        await store._write_conn._execute(raw.set_trace_callback, None)  # type: ignore[attr-defined]
    return threads


async def test_a_lone_append_commits_in_the_loops_thread_a_batch_in_the_connections(
    tmp_path: Path,
) -> None:
    store = SQLiteStore(tmp_path / "log.db")
    with anyio.fail_after(30):
        await store.open()
        try:
            assert await _statement_threads(store, 1) == {threading.get_ident()}
            many = await _statement_threads(store, 50)
            assert many and threading.get_ident() not in many
            assert [r.position for r in await store.read()] == list(range(1, 52))
        finally:
            await store.close()


async def test_a_slow_inline_commit_sends_the_next_ones_to_the_connections_thread(
    tmp_path: Path,
) -> None:
    off = SQLiteStore(tmp_path / "off.db", inline_limit=0)
    slow = SQLiteStore(tmp_path / "slow.db", inline_limit=1e-9)  # every commit is "slow"
    with anyio.fail_after(30):
        for store in (off, slow):
            await store.open()
        try:
            assert threading.get_ident() not in await _statement_threads(off, 1)
            assert await _statement_threads(slow, 1) == {threading.get_ident()}
            assert threading.get_ident() not in await _statement_threads(slow, 1)
        finally:
            for store in (off, slow):
                await store.close()


@pytest.mark.parametrize("limit", [-1.0, float("nan"), float("inf")])
def test_an_odd_inline_limit_is_refused_by_name(tmp_path: Path, limit: float) -> None:
    with pytest.raises(StoreError, match="inline_limit"):
        SQLiteStore(tmp_path / "log.db", inline_limit=limit)


async def test_the_writer_checkpoints_the_wal_off_the_loops_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite's automatic checkpoint is off on the writer's connection (it would run
    inside an inline commit, on the loop's thread); the writer checkpoints every
    ``checkpoint_pages`` WAL pages on a connection and thread of its own, so the WAL
    stays bounded."""
    path = tmp_path / "log.db"
    store = SQLiteStore(path, synchronous="NORMAL")
    threads: set[int] = set()
    connections: set[int] = set()
    real = sqlite_writer._checkpoint

    def checkpoint(conn: sqlite3.Connection) -> None:
        threads.add(threading.get_ident())
        connections.add(id(conn))
        real(conn)

    monkeypatch.setattr(sqlite_writer, "_checkpoint", checkpoint)
    with anyio.fail_after(120):
        await store.open()
        try:
            assert store._write_conn is not None and store._writer is not None
            row = await (await store._write_conn.execute("PRAGMA wal_autocheckpoint")).fetchone()
            assert row is not None and row[0] == 0
            store._writer.checkpoint_pages = 40  # often, to see several
            sizes = []
            for i in range(600):  # lone appends: each commits inline
                await store.append([ev(i)], stream="s")
                if i % 100 == 99:
                    sizes.append((tmp_path / "log.db-wal").stat().st_size)
            assert threads and threading.get_ident() not in threads
            writer_conn = store._write_conn._conn  # type: ignore[attr-defined]
            assert connections - {id(writer_conn)}  # one of its own
            assert store._writer.checkpoints >= 5
            # reused from its start after the checkpoints: it stays bounded (600 commits
            # of ~2 pages each would make it ~1,200 pages of 4 KiB without). These
            # appends never pause: the WAL is not reused after a checkpoint beside them,
            # so every other checkpoint holds the commits (and the WAL is reused). The
            # WAL then reaches a few times ``checkpoint_pages`` (the pages are an
            # estimate, and two checkpoints pass before one holds the commits)
            assert store._writer.blocking_checkpoints >= 1
            assert max(sizes) < 400 * 4096, sizes
            assert [r.position for r in await store.read()] == list(range(1, 601))
        finally:
            await store.close()
    assert not (tmp_path / "log.db-wal").exists() or (tmp_path / "log.db-wal").stat().st_size == 0


def held_checkpoints(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Checkpoints held in their thread: the first event is set when one starts, and it
    goes on once the test sets the second."""
    entered, go = threading.Event(), threading.Event()
    real = sqlite_writer._checkpoint

    def held(conn: sqlite3.Connection) -> None:
        entered.set()
        go.wait(120)
        real(conn)

    monkeypatch.setattr(sqlite_writer, "_checkpoint", held)
    return entered, go


async def append_until(store: SQLiteStore, entered: threading.Event) -> int:
    """Lone appends, with checkpoints due every 10 pages, until a held checkpoint has
    started (see :func:`held_checkpoints`); the number of appends made."""
    assert store._writer is not None
    store._writer.checkpoint_pages = 10
    i = 0
    while not entered.is_set():
        await store.append([ev(i)], stream="s")
        i += 1
        if i % 10 == 0:
            await asyncio.sleep(0.01)  # let the writer task start the checkpoint
    return i


async def test_a_checkpoint_never_holds_a_commit_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint runs beside the commits: appends made while one is in progress (held
    here for as long as the test wants) are durable before it ends, in a batch as alone,
    and the store closes cleanly once it ends."""
    entered, go = held_checkpoints(monkeypatch)
    store = SQLiteStore(tmp_path / "log.db", synchronous="FULL")
    try:
        with anyio.fail_after(60):
            await store.open()
            i = await append_until(store, entered)
            assert i < 200
            # the checkpoint is held in its thread: lone appends and a batch still commit
            for j in range(30):
                await store.append([ev(1000 + j)], stream="s")
            answers = await store.append_many(
                [StreamWrite(f"b{k}", [ev(2000 + k)]) for k in range(20)]
            )
            assert all(isinstance(a, list) for a in answers)
            assert not go.is_set()
            assert len(await store.read()) == i + 30 + 20
    finally:
        go.set()
        with anyio.fail_after(60):
            await store.close()
    again = SQLiteStore(tmp_path / "log.db")
    with anyio.fail_after(60):
        await again.open()
        try:
            assert len(await again.read()) == i + 30 + 20
        finally:
            await again.close()


async def test_a_close_cancelled_during_a_checkpoint_is_finished_by_the_next_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A close cancelled while a checkpoint runs beside the commits (a shutdown under a
    timeout) is finished by the next close: no checkpoint thread or connection is left
    behind, the WAL is moved into the log file and the stop is recorded as clean."""
    entered, go = held_checkpoints(monkeypatch)
    path = tmp_path / "log.db"
    store = SQLiteStore(path)
    try:
        with anyio.fail_after(60):
            await store.open()
            writer = store._writer
            assert writer is not None
            i = await append_until(store, entered)
            closing = asyncio.ensure_future(store.close())
            while writer.running:  # the writer has stopped; close waits for the checkpoint
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            assert not closing.done()
            closing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await closing
    finally:
        go.set()
    with anyio.fail_after(60):
        await store.close()
        await store.close()  # a second one is fine too
    assert writer._checkpoint_conn is None and writer._checkpoint_thread is None
    for _ in range(100):  # its thread ends on its own once told to (no wait at close)
        if not any(t.name.startswith("xcore-store-checkpoint") for t in threading.enumerate()):
            break
        await asyncio.sleep(0.05)
    assert not [
        t.name for t in threading.enumerate() if t.name.startswith("xcore-store-checkpoint")
    ]
    assert not (tmp_path / "log.db-wal").exists() or (tmp_path / "log.db-wal").stat().st_size == 0
    again = SQLiteStore(path)
    with anyio.fail_after(60):
        await again.open()
        try:
            assert [r.position for r in await again.read()] == list(range(1, i + 1))
            assert not (tmp_path / "log.db-wal.unclean").exists()
        finally:
            await again.close()


async def test_a_log_opened_by_a_relative_path_stays_that_file_after_a_chdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A log opened by a relative path (the default ``var/events.db``) stays that file
    when the process changes its working directory later (a plugin's ``os.chdir``): the
    checkpoint's connection, opened at the first checkpoint, checkpointed a new empty
    ``var/events.db`` it created in the new directory, and the clean stop's mark went
    there too."""
    first, other = tmp_path / "first", tmp_path / "other"
    (first / "var").mkdir(parents=True)
    (other / "var").mkdir(parents=True)
    monkeypatch.chdir(first)
    store = SQLiteStore("var/events.db")
    with anyio.fail_after(60):
        await store.open()
        try:
            assert store._writer is not None
            store._writer.checkpoint_pages = 10
            monkeypatch.chdir(other)
            for i in range(200):
                await store.append([ev(i)], stream="s")
                if i % 20 == 19:
                    await asyncio.sleep(0.01)  # let the writer task start checkpoints
            assert store._writer.checkpoints >= 2
        finally:
            await store.close()
    assert sorted(p.name for p in (other / "var").iterdir()) == []
    monkeypatch.chdir(first)
    again = SQLiteStore("var/events.db")
    with anyio.fail_after(60):
        await again.open()
        try:
            assert [r.position for r in await again.read()] == list(range(1, 201))
        finally:
            await again.close()


async def test_the_wal_bound_counts_the_pages_of_large_payloads(tmp_path: Path) -> None:
    """The WAL pages a commit adds are estimated from its payload bytes too: counted as
    1/12 of a page each, events of 20 KB (5 pages each) let the WAL grow to the whole
    log before the first checkpoint (30 KB ones: 233 MB for 8,000 events)."""
    path = tmp_path / "log.db"
    store = SQLiteStore(path, synchronous="NORMAL")
    with anyio.fail_after(120):
        await store.open()
        try:
            assert store._writer is not None
            store._writer.checkpoint_pages = 100
            sizes = []
            for b in range(60):  # 600 events of 20 KB: ~3,000 pages in all
                answers = await store.append_many(
                    [
                        StreamWrite(f"s{k}", [NewEvent.raw("Big", {"b": b, "x": "z" * 20_000})])
                        for k in range(10)
                    ]
                )
                assert all(isinstance(a, list) for a in answers)
                sizes.append((tmp_path / "log.db-wal").stat().st_size)
            for i in range(100):  # lone appends (committed inline), 20 KB each
                await store.append([NewEvent.raw("Big", {"i": i, "x": "z" * 20_000})], stream="l")
                sizes.append((tmp_path / "log.db-wal").stat().st_size)
            assert store._writer.checkpoints >= 10
            # a few times ``checkpoint_pages`` (see the test above: 400-600 pages here),
            # under the 3,500 pages of the log (with room for a slow checkpoint thread)
            assert max(sizes) < 2500 * 4096, max(sizes) // 4096
            assert len(await store.read()) == 700
        finally:
            await store.close()


async def _commits_by_thread(
    store: SQLiteStore, appends: int, slow: float = 0.0, stream: str = "s"
) -> list[bool]:
    """Append ``appends`` lone events one after the other; for each commit, whether it
    ran in the loop's thread. ``slow``: every COMMIT sleeps that long first (a slow
    disk's sync)."""
    assert store._write_conn is not None
    loop_thread = threading.get_ident()
    inline: list[bool] = []

    def trace(sql: str) -> None:
        if is_commit(store, sql):
            inline.append(threading.get_ident() == loop_thread)
            if slow:
                time.sleep(slow)

    raw = store._write_conn._conn  # type: ignore[attr-defined]
    await store._write_conn._execute(raw.set_trace_callback, trace)  # type: ignore[attr-defined]
    try:
        for i in range(appends):
            await store.append([ev(i)], stream=stream)
    finally:
        await store._write_conn._execute(raw.set_trace_callback, None)  # type: ignore[attr-defined]
    return inline


async def test_one_slow_commit_among_fast_ones_keeps_lone_commits_inline(
    tmp_path: Path,
) -> None:
    """A VM's disk syncs slowly now and then: one commit of 4 times ``inline_limit``
    moves the running average by half of it, so the next lone commits stay in the
    loop's thread (one outlier used to send them all to the thread for 2 s)."""
    store = SQLiteStore(tmp_path / "log.db", inline_limit=0.2)
    with anyio.fail_after(60):
        await store.open()
        try:
            await store.append([ev(0)], stream="s")
            assert await _commits_by_thread(store, 1, slow=0.8) == [True]
            assert store._writer is not None and store._writer.commit_average > 0.09
            assert await _commits_by_thread(store, 5) == [True] * 5
        finally:
            await store.close()


async def test_a_disk_that_stays_slow_sends_lone_commits_to_the_thread_until_it_is_fast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop is never held by a slow disk for more than a couple of commits: two
    commits of 5 times ``inline_limit`` lift the average over it, and lone appends go
    through the connection's thread (the loop stays free while it syncs) until their
    commits are fast again."""
    monkeypatch.setattr(sqlite_writer, "_STALL_PAUSE", 0.0)  # the average alone
    store = SQLiteStore(tmp_path / "log.db", inline_limit=0.01)
    with anyio.fail_after(60):
        await store.open()
        try:
            await store.append([ev(0)], stream="s")
            slow = await _commits_by_thread(store, 6, slow=0.05)
            assert slow[0] is True and slow[2:] == [False] * 4, slow
            # fast again: the average decays over the thread's commits, back inline
            fast = await _commits_by_thread(store, 60)
            assert fast[0] is False and fast[-10:] == [True] * 10, fast
        finally:
            await store.close()


async def test_a_stall_of_the_loops_thread_keeps_lone_commits_off_it_for_a_while(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit in the loop's thread of more than 8 times ``inline_limit`` is a stall:
    lone commits stay in the connection's thread for ``_STALL_PAUSE`` seconds even once
    the average is back under the limit, so a disk that stalls now and then blocks the
    loop at most once per pause."""
    monkeypatch.setattr(sqlite_writer, "_STALL_PAUSE", 600.0)
    store = SQLiteStore(tmp_path / "log.db", inline_limit=0.01)
    with anyio.fail_after(60):
        await store.open()
        try:
            await store.append([ev(0)], stream="s")
            assert await _commits_by_thread(store, 1, slow=0.2) == [True]
            # fast commits bring the average under the limit after ~20 of them
            assert await _commits_by_thread(store, 60) == [False] * 60
            assert store._writer is not None
            assert store._writer.commit_average < store._writer.inline_limit
        finally:
            await store.close()


async def test_a_lone_append_is_one_autocommitted_insert(store: SQLiteStore) -> None:
    """Committed in its caller's task, a lone append runs one INSERT in autocommit mode:
    no BEGIN nor COMMIT statement (the sqlite3 module prepares them anew each time),
    and the event is committed (another connection reads it) once the append returns."""
    assert store._write_conn is not None
    statements: list[str] = []
    raw = store._write_conn._conn  # type: ignore[attr-defined]
    with anyio.fail_after(30):
        await store.append([ev(0)], stream="s")  # the stream is known from now on
        await store._write_conn._execute(raw.set_trace_callback, statements.append)  # type: ignore[attr-defined]
        try:
            [r] = await store.append([ev(1)], stream="s")
        finally:
            await store._write_conn._execute(raw.set_trace_callback, None)  # type: ignore[attr-defined]
    assert [s.split(" (")[0] for s in statements] == ["INSERT INTO events"], statements
    assert not raw.in_transaction
    other = sqlite3.connect(store.path)
    try:
        assert other.execute(
            "SELECT version FROM events WHERE position = ?", (r.position,)
        ).fetchall() == [(2,)]
    finally:
        other.close()


async def test_the_store_takes_the_writers_answer_without_its_coroutine(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``SQLiteStore.append`` takes the writer's answer (``offer``: the records of a
    lone append, or the future of a batch) itself: one coroutine per append, not two."""
    assert store._writer is not None

    async def refused(*args: object) -> None:
        raise AssertionError("SQLiteStore.append went through GroupCommitWriter.append")

    monkeypatch.setattr(store._writer, "append", refused)
    with anyio.fail_after(30):
        [first] = await store.append([ev(0)], stream="s")  # a new stream: a batch
        before = store._writer.inline_commits
        [second] = await store.append([ev(1)], stream="s")  # lone, in this task
        assert store._writer.inline_commits == before + 1
        many = await asyncio.gather(*(store.append([ev(i)], stream=f"p{i}") for i in range(10)))
    assert (first.version, second.version) == (1, 2)
    assert sorted(r.position for [r] in many) == list(range(3, 13))


async def test_a_lone_append_commits_in_its_callers_task_when_the_writer_is_idle(
    store: SQLiteStore,
) -> None:
    """No trip through the queue and the writer task for a lone one-event append to a
    stream the writer knows; the first append of a stream goes through the writer."""
    assert store._write_conn is not None
    tasks: list[asyncio.Task[object] | None] = []

    def trace(sql: str) -> None:
        if is_commit(store, sql):
            tasks.append(asyncio.current_task())

    raw = store._write_conn._conn  # type: ignore[attr-defined]
    await store._write_conn._execute(raw.set_trace_callback, trace)  # type: ignore[attr-defined]
    me = asyncio.current_task()
    with anyio.fail_after(30):
        [first] = await store.append([ev(1)], stream="s")
        [second] = await store.append([ev(2)], stream="s")
    await store._write_conn._execute(raw.set_trace_callback, None)  # type: ignore[attr-defined]
    assert store._writer is not None and tasks == [store._writer._task, me]
    assert (first.position, first.version, second.position, second.version) == (1, 1, 2, 2)
    assert [(r.position, r.data) for r in await store.read(stream="s")] == [
        (1, {"i": 1}),
        (2, {"i": 2}),
    ]


async def test_a_caller_appending_in_a_loop_lets_the_loop_run(store: SQLiteStore) -> None:
    """With ``inline_hold`` 0, each append committed in its caller's task yields to the
    loop once after its commit: a timer due at once has run by the time two such
    appends returned."""
    assert store._writer is not None and store.inline_hold == sqlite_writer.INLINE_HOLD
    store._writer.inline_hold = 0.0  # as SQLiteStore(inline_hold=0)
    with anyio.fail_after(30):
        await store.append([ev(0)], stream="s")
        loop = asyncio.get_running_loop()
        ran: list[int] = []
        before = store._writer.inline_commits
        loop.call_at(loop.time(), ran.append, 1)
        await store.append([ev(1)], stream="s")
        assert store._writer.inline_commits == before + 1  # committed in this task
        await store.append([ev(2)], stream="s")
    assert ran == [1]


async def test_appends_in_a_loop_yield_to_the_loop_once_per_hold_not_after_each(
    store: SQLiteStore,
) -> None:
    """A turn of the loop costs about as much Python as the rest of a lone append: a
    caller appending in a loop skips it while it has held the loop for less than
    ``inline_hold`` seconds. A timer due at once has not run after 20 appends committed
    in the caller's task with an hour of hold."""
    assert store._writer is not None
    # no slow commit, checkpoint or index flush sends an append through the writer task
    store._writer.inline_limit = 3600.0
    store._writer.checkpoint_pages = store._writer.index_every = 1 << 40
    with anyio.fail_after(30):
        await store.append([ev(0)], stream="s")
        store._writer.inline_hold = 3600.0
        await store.append([ev(1)], stream="s")  # yields once: the hold starts after it
        loop = asyncio.get_running_loop()
        ran: list[int] = []
        before = store._writer.inline_commits
        loop.call_at(loop.time(), ran.append, 1)
        for i in range(20):
            await store.append([ev(i)], stream="s")
        assert store._writer.inline_commits == before + 20  # all in this task
        assert ran == []  # the loop never turned
        store._writer.inline_hold = 0.0  # the next appends yield (the timer runs in
        await store.append([ev(21)], stream="s")  # the turn after this one's)
        await store.append([ev(22)], stream="s")
    assert ran == [1]


def test_inline_hold_is_checked(tmp_path: Path) -> None:
    for bad in (-0.001, float("nan"), float("inf")):
        with pytest.raises(StoreError, match="inline_hold"):
            SQLiteStore(tmp_path / "log.db", inline_hold=bad)


async def test_inline_hold_reaches_the_writer(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "log.db", inline_hold=0.25)
    with anyio.fail_after(30):
        await store.open()
        try:
            assert store._writer is not None and store._writer.inline_hold == 0.25
        finally:
            await store.close()


async def test_a_caller_appending_without_pause_still_lets_timers_run(store: SQLiteStore) -> None:
    """With the default hold, a task appending in a loop without ever waiting on
    anything else does not starve the loop: a timer due at once runs while it goes on,
    every append committed in the task itself (no slow commit, checkpoint or index
    flush hands the loop a turn through the writer's task here)."""
    assert store._writer is not None
    store._writer.inline_limit = 3600.0
    store._writer.checkpoint_pages = store._writer.index_every = 1 << 40
    with anyio.fail_after(120):
        await store.append([ev(0)], stream="s")
        loop = asyncio.get_running_loop()
        ran: list[int] = []
        loop.call_at(loop.time(), ran.append, 1)
        before = store._writer.inline_commits
        appended = 0
        while not ran and appended < 5_000:  # bounded: a starved loop cannot cancel
            await store.append([ev(appended)], stream="s")
            appended += 1
    assert ran == [1], f"the timer never ran during {appended} appends"
    assert store._writer.inline_commits == before + appended


async def test_a_lone_append_that_fills_the_disk_fails_alone_and_the_log_goes_on(
    tmp_path: Path,
) -> None:
    """Committed in its caller's task, an append the disk refuses is rolled back there
    and reported as in a batch ("the disk is full"); positions stay gapless."""
    path = tmp_path / "log.db"
    store = SQLiteStore(path, max_page_count=40)
    with anyio.fail_after(30):
        await store.open()
        try:
            await store.append([ev(0)], stream="s")  # the stream is known: lone path
            assert store._writer is not None
            before = store._writer.inline_commits
            big = NewEvent.raw("Big", {"blob": "x" * 400_000})
            with pytest.raises(StoreError, match="disk is full"):
                await store.append([big], stream="s")
            [r] = await store.append([ev(2)], stream="s")
            assert (r.position, r.version) == (2, 2)
            assert store._writer.inline_commits == before + 1  # the last one, inline
            assert [(x.position, x.version) for x in await store.read(stream="s")] == [
                (1, 1),
                (2, 2),
            ]
        finally:
            await store.close()
    reopened = SQLiteStore(path)
    await reopened.open()
    try:
        assert [x.data.get("i") for x in await reopened.read()] == [0, 2]
    finally:
        await reopened.close()


async def test_data_and_meta_are_stored_as_blobs_and_read_back_as_bytes(
    tmp_path: Path,
) -> None:
    """The writer binds them as bytearray (cheaper for the sqlite3 module than bytes):
    what is stored and read back is the same BLOB as before, bytes in every reader."""
    path = tmp_path / "log.db"
    store = SQLiteStore(path)
    with anyio.fail_after(30):
        await store.open()
        try:
            await store.append([ev(0)], stream="s")
            await store.append([ev(1)], stream="s")  # lone, in the caller's task
            await asyncio.gather(*(store.append([ev(i)], stream=f"p{i}") for i in range(20)))
            await store.append([ev(i) for i in range(3)], stream="s")
        finally:
            await store.close()
    conn = sqlite3.connect(path)
    try:
        kinds = set(conn.execute("SELECT typeof(data), typeof(meta) FROM events").fetchall())
        rows = conn.execute("SELECT data, meta FROM events ORDER BY position").fetchall()
    finally:
        conn.close()
    assert kinds == {("blob", "blob")}
    assert all(type(d) is bytes and type(m) is bytes for d, m in rows)
    reopened = SQLiteStore(path, readonly=True)
    await reopened.open()
    try:
        records = await reopened.read()
        assert len(records) == 25 and [r.data["i"] for r in records[:2]] == [0, 1]
        assert all(type(r.meta.id) is str for r in records)
    finally:
        await reopened.close()


async def test_a_lone_append_after_a_foreign_row_goes_on_after_it(tmp_path: Path) -> None:
    """Committed in its caller's task, an append whose position another process took
    is rolled back there and redone by the writer after the log's new end."""
    path = tmp_path / "log.db"
    store = SQLiteStore(path)
    with anyio.fail_after(30):
        await store.open()
        try:
            await store.append([ev(0)], stream="s")
            await store.append([ev(1)], stream="s")  # lone: the stream is known
            assert store._writer is not None
            before = store._writer.inline_commits
            conn = sqlite3.connect(path)
            conn.execute(
                "INSERT INTO events VALUES (3, 's', 3, 'Counted', 1, '{}', '{}', 'foreign', 0)"
            )
            conn.commit()
            conn.close()
            [r] = await store.append([ev(2)], stream="s")
            assert (r.position, r.version) == (4, 4)
            # the refused autocommitted INSERT left the connection's transactions as
            # they were (batches still begin one implicitly)
            assert store._write_conn is not None
            assert store._write_conn._conn.isolation_level == "IMMEDIATE"  # type: ignore[attr-defined]
            [r] = await store.append([ev(3)], stream="s")  # lone again
            assert (r.position, r.version) == (5, 5)
            # the clash went to the writer task (its retry after the new end committed
            # in the loop's thread too), the next append was lone again
            assert store._writer.inline_commits == before + 2
            assert [x.position for x in await store.read(stream="s")] == [1, 2, 3, 4, 5]
        finally:
            await store.close()


async def test_concurrent_appends_to_known_streams_still_share_transactions(
    store: SQLiteStore,
) -> None:
    """The lone path is for a lone append only: producers ready at the same moment, on
    streams the writer knows, still join one batch rather than each committing alone."""
    assert store._write_conn is not None
    with anyio.fail_after(30):
        await asyncio.gather(*(store.append([ev(i)], stream=f"p{i}") for i in range(50)))
        commits: list[str] = []
        raw = store._write_conn._conn  # type: ignore[attr-defined]
        await store._write_conn._execute(  # type: ignore[attr-defined]
            raw.set_trace_callback,
            lambda s: commits.append(s) if is_commit(store, s) else None,
        )
        try:
            await asyncio.gather(*(store.append([ev(i)], stream=f"p{i}") for i in range(50)))
        finally:
            await store._write_conn._execute(raw.set_trace_callback, None)  # type: ignore[attr-defined]
    assert 1 <= len(commits) <= 3, f"{len(commits)} commits for 50 concurrent appends"
    assert await store.last_position() == 100


async def test_a_big_lone_append_commits_in_the_connections_thread(store: SQLiteStore) -> None:
    """The loop's thread commits only small lone writes: an append of many events, or of
    one big payload, goes through the connection's thread (it held the loop for its
    whole insert and sync), and is not counted in the average of lone commits."""
    assert store._write_conn is not None and store._writer is not None
    threads: list[int] = []

    def trace(sql: str) -> None:
        if sql.startswith("INSERT INTO events"):
            threads.append(threading.get_ident())

    raw = store._write_conn._conn  # type: ignore[attr-defined]
    await store._write_conn._execute(raw.set_trace_callback, trace)  # type: ignore[attr-defined]
    here = threading.get_ident()
    big = NewEvent.raw("Big", {"blob": "x" * (sqlite_writer.INLINE_BYTES + 1)})
    try:
        with anyio.fail_after(60):
            await store.append([ev(0)], stream="s")  # the stream is known from now on
            assert threads[-1] == here
            await store.append([ev(i) for i in range(sqlite_writer.INLINE_EVENTS + 1)], stream="s")
            assert threads[-1] != here
            average = store._writer.commit_average
            await store.append([big], stream="s")  # lone, one event, too big
            assert threads[-1] != here
            assert store._writer.commit_average == average
            await store.append([ev(1)], stream="s")
            assert threads[-1] == here  # small again: inline
    finally:
        await store._write_conn._execute(raw.set_trace_callback, None)  # type: ignore[attr-defined]
    versions = [r.version for r in await store.read(stream="s")]
    assert versions == list(range(1, sqlite_writer.INLINE_EVENTS + 5))


async def test_a_full_disk_during_append_many_names_each_stream_and_writes_nothing(
    tmp_path: Path,
) -> None:
    """The disk refuses the batch: each write's error names its own stream, nothing of
    the batch is in the log, health says why, and the next append_many goes on gapless."""
    path = tmp_path / "log.db"
    store = SQLiteStore(path, max_page_count=40)
    big = NewEvent.raw("Big", {"blob": "x" * 400_000})
    with anyio.fail_after(30):
        await store.open()
        try:
            await store.append([ev(0)], stream="a")
            answers = await store.append_many(
                [StreamWrite("a", [ev(1)]), StreamWrite("b", [big]), StreamWrite("c", [ev(3)])]
            )
            for stream, answer in zip("abc", answers, strict=True):
                assert isinstance(answer, StoreError)
                assert f"stream {stream!r}" in str(answer) and "disk is full" in str(answer)
            assert store.health()[0] is False
            assert [r.position for r in await store.read()] == [1]
            again = await store.append_many([StreamWrite("a", [ev(1)]), StreamWrite("c", [ev(3)])])
            assert [[(r.position, r.version) for r in w] for w in again] == [  # type: ignore[union-attr]
                [(2, 2)],
                [(3, 1)],
            ]
            assert store.health()[0] is True
        finally:
            await store.close()
    reopened = SQLiteStore(path)
    await reopened.open()
    try:
        assert [(r.position, r.stream) for r in await reopened.read()] == [
            (1, "a"),
            (2, "a"),
            (3, "c"),
        ]
    finally:
        await reopened.close()


async def test_an_event_larger_than_sqlite_takes_fails_alone(store: SQLiteStore) -> None:
    """SQLite refuses a value over its length limit (1 GB by default; lowered here on
    the writer's own connection): only the append that carries it fails, the others of
    its batch are stored, and the log stays healthy."""
    assert store._write_conn is not None
    raw = store._write_conn._conn  # type: ignore[attr-defined]
    await store._write_conn._execute(raw.setlimit, sqlite3.SQLITE_LIMIT_LENGTH, 100_000)  # type: ignore[attr-defined]
    huge = NewEvent.raw("Huge", {"blob": "x" * 200_000})
    with anyio.fail_after(30):
        answers = await store.append_many(
            [StreamWrite("a", [ev(1)]), StreamWrite("b", [huge]), StreamWrite("c", [ev(3)])]
        )
        a, b, c = answers
        assert isinstance(b, StoreError) and "stream 'b'" in str(b) and "too big" in str(b)
        assert not isinstance(a, StoreError) and not isinstance(c, StoreError)
        assert store.health()[0] is True
        with pytest.raises(StoreError, match="too big"):
            await store.append([huge], stream="b")
        assert store.health()[0] is True
        assert [(r.position, r.stream) for r in await store.read()] == [(1, "a"), (2, "c")]


async def test_append_many_refuses_a_stream_name_that_is_not_text_alone(
    store: SQLiteStore,
) -> None:
    with anyio.fail_after(30):
        bad, good = await store.append_many(
            [StreamWrite("bad\udc80", [ev(1)]), StreamWrite("good", [ev(2)])]
        )
    assert isinstance(bad, StoreError) and "not valid text" in str(bad)
    assert not isinstance(good, StoreError) and [r.stream for r in good] == ["good"]
    assert [r.stream for r in await store.read()] == ["good"]


async def test_an_append_many_waits_for_its_batch_with_one_wake_up(tmp_path: Path) -> None:
    """The writes of one ``append_many`` are answered in one commit: the caller waits
    for them with one wake-up, not one loop callback per write (100 writes: 100
    callbacks more in the loop step that answers them)."""
    store = SQLiteStore(tmp_path / "log.db", synchronous="NORMAL")
    with anyio.fail_after(60):
        await store.open()
        try:
            loop = asyncio.get_running_loop()
            ran = 0
            real = loop.call_soon

            def counted(*args: Any, **kwargs: Any) -> Any:
                nonlocal ran
                ran += 1
                return real(*args, **kwargs)

            loop.call_soon = counted  # type: ignore[method-assign]
            try:
                answers = await store.append_many(
                    [StreamWrite(f"s{i}", [ev(i)]) for i in range(100)]
                )
            finally:
                del loop.call_soon  # type: ignore[method-assign]
            assert all(isinstance(a, list) for a in answers)
            assert ran < 50, ran
        finally:
            await store.close()
