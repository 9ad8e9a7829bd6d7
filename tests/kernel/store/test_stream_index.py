"""The SQLite log's lagged stream index: reads by stream stay exact across its mark.

Each test checks the mechanism, not only the result: the index is written (rows appear
in ``streams_index`` every ``index_every`` events, sorted, with the mark), the
unindexed end is read (reads see events the index does not hold yet), the end is
reloaded at open, and a format-1 log is upgraded.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from kernel.errors import ConcurrencyError, StoreCorrupt, StoreError
from kernel.events import Meta, NewEvent
from kernel.store import SQLiteStore
from kernel.store.sqlite import FORMAT


def ev(i: int, kind: str = "A") -> NewEvent:
    return NewEvent(kind, orjson.dumps({"i": i}), Meta())


def index_rows(path: Path) -> tuple[list[tuple[str, int, int]], int]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT stream, version, position FROM streams_index").fetchall()
        mark = conn.execute("SELECT value FROM xcore_meta WHERE key = 'indexed_upto'").fetchone()
    finally:
        conn.close()
    return rows, int(mark[0]) if mark else 0


async def test_reads_by_stream_are_exact_on_both_sides_of_the_mark(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "log.db", index_every=7)
    await store.open()
    rng = random.Random(4)
    streams = [f"s{i}" for i in range(5)]
    try:
        for i in range(120):
            stream = rng.choice(streams)
            await store.append(
                [ev(i, rng.choice("AB")) for _ in range(rng.randint(1, 3))], stream=stream
            )
        everything = await store.read()
        _, mark = index_rows(tmp_path / "log.db")
        assert 0 < mark < everything[-1].position  # both an indexed part and an end
        # the writer's in-memory tail answers recent reads: a read-only store on the
        # same file asks SQLite, through the index and the unindexed end
        reader = SQLiteStore(tmp_path / "log.db", readonly=True)
        await reader.open()
    except BaseException:
        await store.close()
        raise
    try:
        for stream in streams:
            mine = [r for r in everything if r.stream == stream]
            for after in (0, mark - 1, mark, mark + 1, everything[-1].position):
                for types in (None, ["A"], ["B"], ["A", "B"]):
                    for limit in (None, 1, 5):
                        want = [
                            r.position
                            for r in mine
                            if r.position > after and (types is None or r.type in types)
                        ][:limit]
                        got = [
                            r.position
                            for r in await reader.read(
                                after=after, stream=stream, types=types, limit=limit
                            )
                        ]
                        assert got == want, (stream, after, types, limit)
            assert await reader.stream_version(stream) == len(mine)
    finally:
        await reader.close()
        await store.close()


async def test_sqlite_answers_stream_reads_with_the_index_and_the_end(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    store = SQLiteStore(path, index_every=10)
    await store.open()
    try:
        for i in range(25):
            await store.append([ev(i)], stream=f"s{i % 3}")
        rows, mark = index_rows(path)
        # flushed twice (after 10 and 20 events), sorted by stream then version
        assert mark == 20 and len(rows) == 20
        assert rows == sorted(rows)
        reader = SQLiteStore(path, readonly=True)
        await reader.open()
        try:  # a read-only store asks SQLite (no in-memory tail)
            for s in ("s0", "s1", "s2"):
                got = [(r.stream, r.version) for r in await reader.read(stream=s)]
                assert got == [(s, v) for v in range(1, len(got) + 1)]
                assert got[-1][1] == await reader.stream_version(s)
            total = 0
            for s in ("s0", "s1", "s2"):
                total += len(await reader.read(stream=s))
            assert total == 25
        finally:
            await reader.close()
    finally:
        await store.close()
    rows, mark = index_rows(path)
    assert mark == 25 and len(rows) == 25  # a clean close indexes the end


async def test_the_end_is_reloaded_after_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    script = textwrap.dedent(
        f"""
        import asyncio, os, orjson
        from kernel.events import Meta, NewEvent
        from kernel.store import SQLiteStore

        async def main():
            store = SQLiteStore({str(path)!r}, index_every=10)
            await store.open()
            for i in range(15):
                await store.append([NewEvent("A", orjson.dumps({{"i": i}}), Meta())],
                                   stream="s" + str(i % 2))
            os._exit(0)  # no close: the last 5 events stay unindexed

        asyncio.run(main())
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    rows, mark = index_rows(path)
    assert mark == 10 and len(rows) == 10
    store = SQLiteStore(path, index_every=10, accept_log_loss=True)
    await store.open()
    try:
        assert await store.stream_version("s0") == 8 and await store.stream_version("s1") == 7
        for i in range(15, 20):  # crossing the bound flushes the reloaded end too
            await store.append([ev(i)], stream=f"s{i % 2}")
        rows, mark = index_rows(path)
        assert mark == 20 and len(rows) == 20
        for s, n in (("s0", 10), ("s1", 10)):
            assert [r.version for r in await store.read(stream=s)] == list(range(1, n + 1))
    finally:
        await store.close()


async def test_an_outside_insert_of_an_indexed_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    store = SQLiteStore(path)
    await store.open()
    await store.append([ev(1)], stream="s")
    await store.close()  # indexes the end
    conn = sqlite3.connect(path)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute(
                "INSERT INTO events VALUES (5, 's', 1, 'Forged', 1, '{}', '{}', 'new-id', 0)"
            )
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("DELETE FROM streams_index")
    finally:
        conn.close()


FORMAT_1 = """
CREATE TABLE xcore_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE events (
    position INTEGER PRIMARY KEY, stream TEXT NOT NULL, version INTEGER NOT NULL,
    type TEXT NOT NULL, schema INTEGER NOT NULL, data BLOB NOT NULL, meta BLOB NOT NULL,
    id TEXT NOT NULL, recorded_at REAL NOT NULL, UNIQUE (stream, version)
);
CREATE UNIQUE INDEX events_id ON events (id);
CREATE TRIGGER events_append_only_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'the xcore event log is append-only'); END;
CREATE TRIGGER events_append_only_delete BEFORE DELETE ON events
BEGIN SELECT RAISE(ABORT, 'the xcore event log is append-only'); END;
CREATE TABLE checkpoints (name TEXT PRIMARY KEY, position INTEGER NOT NULL);
CREATE TABLE snapshots (name TEXT PRIMARY KEY, position INTEGER NOT NULL,
    schema INTEGER NOT NULL, state BLOB NOT NULL);
INSERT INTO xcore_meta VALUES ('format', '1');
"""


def _format_1_log(path: Path, events: int) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(FORMAT_1)
    for i in range(1, events + 1):
        meta = Meta().to_json()
        conn.execute(
            "INSERT INTO events VALUES (?, ?, ?, 'A', 1, ?, ?, ?, 0)",
            (i, f"s{i % 3}", (i + 2) // 3, orjson.dumps({"i": i}), meta, orjson.loads(meta)["id"]),
        )
    conn.commit()
    conn.close()


async def test_a_format_1_log_is_read_as_it_is_and_upgraded_when_written(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    _format_1_log(path, 30)
    reader = SQLiteStore(path, readonly=True)
    await reader.open()
    try:
        assert reader.format == 1
        assert [r.position for r in await reader.read(stream="s1")] == list(range(1, 31, 3))
        assert await reader.stream_version("s2") == 10
    finally:
        await reader.close()

    store = SQLiteStore(path, accept_log_loss=True, allow_new_log=True)
    await store.open()
    try:
        assert store.format == FORMAT
        assert [r.position for r in await store.read(stream="s1")] == list(range(1, 31, 3))
        [r] = await store.append([ev(31)], stream="s1", expected_version=10)
        assert (r.position, r.version) == (31, 11)
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    try:
        sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'events'").fetchone()[0]
        assert "UNIQUE" not in sql
        assert conn.execute("SELECT value FROM xcore_meta WHERE key='format'").fetchone() == (
            str(FORMAT),
        )
        assert conn.execute("SELECT COUNT(*) FROM streams_index").fetchone() == (31,)
        # format 3: the id index replaces the UNIQUE index on events (id)
        assert conn.execute("SELECT COUNT(*) FROM ids_index").fetchone() == (31,)
        assert (
            conn.execute("SELECT name FROM sqlite_master WHERE name = 'events_id'").fetchall() == []
        )
    finally:
        conn.close()


async def test_an_upgrade_on_a_full_disk_says_so_and_leaves_the_log_as_it_was(
    tmp_path: Path,
) -> None:
    path = tmp_path / "log.db"
    _format_1_log(path, 3000)
    conn = sqlite3.connect(path)
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.close()
    # room for a few pages only: the copy of the events cannot fit
    store = SQLiteStore(path, max_page_count=pages + 5, allow_new_log=True)
    with pytest.raises(StoreError, match="disk is full") as caught:
        await store.open()
    assert not isinstance(caught.value, StoreCorrupt)  # the log is not damaged
    reader = SQLiteStore(path, readonly=True)
    await reader.open()
    try:
        assert reader.format == 1
        assert len(await reader.read()) == 3000
    finally:
        await reader.close()
    store = SQLiteStore(path, allow_new_log=True)  # with room, the upgrade is done
    await store.open()
    try:
        assert store.format == FORMAT
        assert [r.position for r in await store.read(stream="s1", limit=3)] == [1, 4, 7]
    finally:
        await store.close()


async def test_concurrent_version_reads_share_one_query_on_both_sides_of_the_mark(
    tmp_path: Path,
) -> None:
    """A burst of ``stream_version`` calls (a scheduler's claims after boot) is answered
    by one query per round, exactly, for streams with indexed events, events after the
    mark, both, or none."""
    path = tmp_path / "log.db"
    store = SQLiteStore(path, index_every=7)
    await store.open()
    rng = random.Random(7)
    streams = [f"s{i}" for i in range(40)] + ["odd 'name\" é", "x" * 300]
    truth: dict[str, int] = {}
    try:
        for i in range(150):
            stream = rng.choice(streams)
            n = rng.randint(1, 3)
            await store.append([ev(i) for _ in range(n)], stream=stream)
            truth[stream] = truth.get(stream, 0) + n
        _, mark = index_rows(path)
        assert 0 < mark < sum(truth.values())
        reader = SQLiteStore(path, readonly=True)  # no writer: every answer is read
        await reader.open()
        try:
            queries: list[str] = []
            query = reader._query

            async def counted(sql: str, params: Any) -> list[Any]:
                queries.append(sql)
                return await query(sql, params)

            reader._query = counted  # type: ignore[method-assign]
            asked = [*streams, "never-written"]
            with anyio.fail_after(30):
                got = await asyncio.gather(*(reader.stream_version(s) for s in asked))
            assert dict(zip(asked, got, strict=True)) == {
                **{s: truth.get(s, 0) for s in streams},
                "never-written": 0,
            }
            assert len(queries) == 1  # one round, one statement (fewer than 500 streams)
        finally:
            await reader.close()
    finally:
        await store.close()


async def test_the_writer_learns_a_batch_s_new_streams_in_one_query(tmp_path: Path) -> None:
    """A writer that has not seen a batch's streams yet (just opened) learns their
    versions in one query, not one trip each, and still checks expected versions."""
    path = tmp_path / "log.db"
    store = SQLiteStore(path, index_every=5)
    await store.open()
    streams = [f"s{i}" for i in range(30)]
    try:
        for i, s in enumerate(streams):
            await store.append([ev(i) for _ in range(1 + i % 3)], stream=s)
    finally:
        await store.close()
    store = SQLiteStore(path, index_every=5)
    await store.open()
    try:
        writer = store._writer
        assert writer is not None and not writer.versions
        single: list[str] = []
        bulk: list[int] = []
        one, many = writer._stream_version, writer._load_versions

        async def one_counted(stream: str) -> int:
            single.append(stream)
            return await one(stream)

        async def many_counted(names: list[str]) -> None:
            bulk.append(len(names))
            await many(names)

        writer._stream_version = one_counted  # type: ignore[method-assign]
        writer._load_versions = many_counted  # type: ignore[method-assign]
        with anyio.fail_after(30):
            done = await asyncio.gather(
                *(
                    store.append([ev(100 + i)], stream=s, expected_version=1 + i % 3)
                    for i, s in enumerate(streams)
                ),
                store.append([ev(999)], stream="new", expected_version=0),
                store.append([ev(998)], stream="s0", expected_version=7),
                return_exceptions=True,
            )
        assert [r[0].version for r in done[:30]] == [2 + i % 3 for i in range(30)]  # type: ignore[index]
        assert done[30][0].version == 1  # type: ignore[index]
        assert isinstance(done[31], ConcurrencyError)  # a stale expectation still fails
        assert bulk and sum(bulk) >= 30
        assert len(single) <= 1  # (a batch of one asks for its stream alone)
    finally:
        await store.close()


async def test_a_stream_name_sqlite_cannot_store_fails_alone(tmp_path: Path) -> None:
    """A lone surrogate in a stream's name is refused to its caller; the appends and
    version reads batched with it go through."""
    store = SQLiteStore(tmp_path / "log.db")
    await store.open()
    try:
        with anyio.fail_after(30):
            done = await asyncio.gather(
                *(store.append([ev(i)], stream=s) for i, s in enumerate(["a", "\ud800x", "b"])),
                return_exceptions=True,
            )
            assert isinstance(done[1], StoreError) and "\\ud800x" in str(done[1])
            assert [r[0].version for r in (done[0], done[2])] == [1, 1]  # type: ignore[index]
            versions = await asyncio.gather(
                *(store.stream_version(s) for s in ["a", "\ud800y", "c"]),
                return_exceptions=True,
            )
        assert versions[0] == 1 and versions[2] == 0
        assert isinstance(versions[1], StoreError)
    finally:
        await store.close()


@pytest.mark.parametrize("tampered", [0, 3, 9, 1000], ids=["zero", "lowered", "raised", "past"])
async def test_a_mark_moved_by_another_program_is_put_back_at_open(
    tmp_path: Path, tampered: int
) -> None:
    """``xcore_meta`` takes outside writes: a lowered mark made reads by stream return
    the indexed events after it twice, a raised one left the events after the true mark
    out of every read by stream for good. The writer's open finds the true mark and
    puts it back; ``replay verify`` reports a lowered mark in a log nobody reopened."""
    from replay.source import open_log
    from replay.verify import verify

    path = tmp_path / "log.db"
    store = SQLiteStore(path, index_every=4)
    with anyio.fail_after(60):
        await store.open()
        try:
            for i in range(6):
                await store.append([ev(i)], stream="s")
            await store.append([ev(6)], stream="t")
            _, mark = index_rows(path)
            assert mark == 4
        finally:
            await store.close()
        _, mark = index_rows(path)
        assert mark == 7  # a clean close indexes the end
        conn = sqlite3.connect(path)
        for p in (8, 9, 10):  # an unindexed end, written by another program
            conn.execute(
                "INSERT INTO events VALUES (?, 'o', ?, 'A', 1, '{}', ?, ?, 0)",
                (p, p - 7, orjson.dumps({"id": f"outside-{p}"}), f"outside-{p}"),
            )
        conn.execute("UPDATE xcore_meta SET value = ? WHERE key = 'indexed_upto'", (str(tampered),))
        conn.commit()
        conn.close()
        with open_log(path) as log:
            assert not verify(log).ok
        store = SQLiteStore(path, index_every=4)
        await store.open()
        try:
            assert [r.version for r in await store.read(stream="s")] == [1, 2, 3, 4, 5, 6]
            assert [r.version for r in await store.read(stream="o")] == [1, 2, 3]
            await store.append([ev(7)], stream="s")
            assert [r.version for r in await store.read(stream="s")] == list(range(1, 8))
            for i in range(8):  # through a flush
                await store.append([ev(i)], stream="u")
            assert [r.version for r in await store.read(stream="s")] == list(range(1, 8))
            assert len(await store.read(stream="u")) == 8
            assert [r.version for r in await store.read(stream="o")] == [1, 2, 3]
        finally:
            await store.close()
        with open_log(path) as log:
            assert verify(log).ok


@pytest.mark.parametrize("tampered", [0, 10**6], ids=["lowered", "raised"])
async def test_a_mark_moved_while_the_writer_runs_is_put_back_by_its_next_flush(
    tmp_path: Path, tampered: int
) -> None:
    """The flush indexed the events after the stored mark: raised by another program
    while the writer ran, the events between the true mark and it were never indexed
    (left out of every read by stream, for good, as the flush moved the mark past them).
    The flush indexes after the writer's own mark and puts the stored one back."""
    from replay.source import open_log
    from replay.verify import verify

    path = tmp_path / "log.db"
    store = SQLiteStore(path, index_every=4)
    with anyio.fail_after(60):
        await store.open()
        try:
            for i in range(6):  # a flush at 4, two events after it
                await store.append([ev(i)], stream="s")
            conn = sqlite3.connect(path)
            conn.execute(
                "UPDATE xcore_meta SET value = ? WHERE key = 'indexed_upto'", (str(tampered),)
            )
            conn.commit()
            conn.close()
            for i in range(4):  # through the next flush, lone and batched
                if i % 2:
                    await store.append([ev(i)], stream="s")
                else:
                    await asyncio.gather(*[store.append([ev(i)], stream=f"t{i}") for _ in "ab"])
            _, mark = index_rows(path)
            assert mark == await store.last_position() == 12
            assert [r.version for r in await store.read(stream="s")] == list(range(1, 9))
        finally:
            await store.close()
        with open_log(path) as log:
            assert verify(log).ok
