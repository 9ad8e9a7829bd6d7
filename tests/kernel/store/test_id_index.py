"""The SQLite log's lagged id index (format 3): one page per one-event commit, ids still
stored once.

Each test checks a mechanism of ``kernel/store/sqlite_ids.py``: no index on
``events (id)`` (a lone commit writes one WAL frame), the id index written with the
stream index's mark, the unindexed end's ids held in memory and reloaded at open, ids
refused or recognised on both sides of the mark, an outside duplicate reported by
``replay verify``, and format-2 logs read as they are and upgraded when written.
"""

from __future__ import annotations

import asyncio
import io
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anyio
import orjson
import pytest

from kernel.errors import StoreError
from kernel.events import Meta, NewEvent
from kernel.store import SQLiteStore
from kernel.store.sqlite import FORMAT
from replay.source import open_log
from replay.verify import verify

pytestmark = pytest.mark.anyio


def ev(i: int, id_: str | None = None) -> NewEvent:
    if id_ is None:
        return NewEvent("A", orjson.dumps({"i": i}), Meta())
    return NewEvent("A", orjson.dumps({"i": i}), Meta(id=id_), explicit_id=True)


def ids_index(path: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return dict(conn.execute("SELECT id, position FROM ids_index").fetchall())
    finally:
        conn.close()


def wal_frames(path: Path) -> int:
    wal = Path(f"{path}-wal")
    size = wal.stat().st_size if wal.exists() else 0
    return max(0, (size - 32)) // (4096 + 24)


async def test_a_one_event_commit_writes_one_page(tmp_path: Path) -> None:
    """The events table has no secondary index: a lone append adds one frame (the
    table's leaf) to the WAL, not two (with an id index leaf)."""
    path = tmp_path / "log.db"
    store = SQLiteStore(path)
    with anyio.fail_after(60):
        await store.open()
        try:
            for i in range(3):
                await store.append([ev(i)], stream="s")
            grown = []
            for i in range(5):
                before = wal_frames(path)
                await store.append([ev(i)], stream="s")
                grown.append(wal_frames(path) - before)
            assert grown == [1] * 5
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                indexes = conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'events'"
                ).fetchall()
            finally:
                conn.close()
            assert indexes == []
        finally:
            await store.close()


async def test_an_explicit_id_is_stored_once_on_either_side_of_the_mark(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    store = SQLiteStore(path, index_every=4)
    with anyio.fail_after(60):
        await store.open()
        try:
            [a] = await store.append([ev(1, "id-a")], stream="s")
            for i in range(4):  # crosses the bound: id-a goes to the index
                await store.append([ev(i)], stream="t")
            [b] = await store.append([ev(2, "id-b")], stream="s")
            assert "id-a" in ids_index(path) and "id-b" not in ids_index(path)
            assert store._writer is not None and "id-b" in store._writer.unindexed_ids
            again = await store.append([ev(9, "id-a"), ev(9, "id-b")], stream="s")
            assert [r.position for r in again] == [a.position, b.position]
            [lone] = await store.append([ev(9, "id-b")], stream="other")
            assert lone.position == b.position and lone.stream == "s"
            assert await store.last_position() == 6
        finally:
            await store.close()
        assert ids_index(path)["id-b"] == b.position  # a clean close indexes the end
        store = SQLiteStore(path, index_every=4)
        await store.open()
        try:
            [r] = await store.append([ev(9, "id-b")], stream="s")
            assert r.position == b.position and await store.last_position() == 6
        finally:
            await store.close()


async def test_an_id_reused_without_explicit_is_refused_on_either_side(tmp_path: Path) -> None:
    """As the UNIQUE index of format 2 did: the unindexed end in memory, the index by a
    probe; the caller is told, nothing is written, other appends go on."""
    path = tmp_path / "log.db"
    store = SQLiteStore(path, index_every=3)
    with anyio.fail_after(60):
        await store.open()
        try:
            [old] = await store.append([ev(0)], stream="s")
            for i in range(3):
                await store.append([ev(i)], stream="s")
            [new] = await store.append([ev(0)], stream="s")
            assert old.meta.id in ids_index(path) and new.meta.id not in ids_index(path)
            for taken in (old.meta.id, new.meta.id):
                dup = NewEvent("A", b'{"i": -1}', Meta(id=taken))  # not explicit
                # to a stream the writer knows: the lone path, committed in the caller's task
                with pytest.raises(StoreError, match="already in the log"):
                    await store.append([dup], stream="s")
                with pytest.raises(StoreError, match="already in the log"):
                    await store.append([ev(5), dup], stream="d")
            assert await store.last_position() == 5
            assert await store.read(stream="d") == []
            assert store._writer is not None and store._writer.inline_commits > 0
        finally:
            await store.close()


async def test_the_unindexed_ids_are_reloaded_after_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    script = textwrap.dedent(
        f"""
        import asyncio, os, orjson
        from kernel.events import Meta, NewEvent
        from kernel.store import SQLiteStore

        async def main():
            store = SQLiteStore({str(path)!r}, index_every=10)
            await store.open()
            for i in range(13):
                await store.append([NewEvent("A", orjson.dumps({{"i": i}}),
                                    Meta(id="key-" + str(i)), explicit_id=True)], stream="s")
            os._exit(0)  # no close: the last 3 events stay unindexed

        asyncio.run(main())
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    assert sorted(ids_index(path)) == sorted(f"key-{i}" for i in range(10))
    store = SQLiteStore(path, index_every=10, accept_log_loss=True)
    with anyio.fail_after(60):
        await store.open()
        try:
            assert store._writer is not None
            assert store._writer.unindexed_ids == {"key-10": 11, "key-11": 12, "key-12": 13}
            got = await store.append([ev(0, "key-12"), ev(0, "key-3")], stream="x")
            assert [(r.position, r.stream) for r in got] == [(4, "s"), (13, "s")]
            dup = NewEvent("A", b"{}", Meta(id="key-11"))
            with pytest.raises(StoreError, match="already in the log"):
                await store.append([dup], stream="x")
            assert await store.last_position() == 13
        finally:
            await store.close()


async def test_an_outside_duplicate_id_in_the_unindexed_end_is_reported(tmp_path: Path) -> None:
    """What no trigger can see cheaply (an id only in the unindexed end, reused by an
    outside connection): stored, the writer goes on, the first position keeps the id,
    and ``replay verify`` reports it by position."""
    path = tmp_path / "log.db"
    store = SQLiteStore(path)
    with anyio.fail_after(60):
        await store.open()
        try:
            [a] = await store.append([ev(1, "key")], stream="s")
            conn = sqlite3.connect(path)
            try:
                conn.execute("INSERT INTO events VALUES (2, 'z', 1, 'A', 1, '{}', '{}', 'key', 0)")
                conn.commit()
            finally:
                conn.close()
            [b] = await store.append([ev(2)], stream="s")
            assert b.position == 3  # after the outside row (the writer resynced)
            [again] = await store.append([ev(3, "key")], stream="s")
            assert again.position == a.position
        finally:
            await store.close()  # indexes the end: the duplicate must not wedge it
    assert ids_index(path)["key"] == a.position
    with open_log(path) as log:
        assert log.by_id("key") is not None and log.by_id("key").position == 1  # type: ignore[union-attr]
        report = verify(log)
    [ids] = [c for c in report.checks if c.name == "event ids unique"]
    assert [(d.kind, d.position) for d in ids.defects] == [("id", 2)]
    assert not report.ok


async def test_the_id_index_is_append_only_against_outside_writers(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    store = SQLiteStore(path)
    with anyio.fail_after(60):
        await store.open()
        [a] = await store.append([ev(1, "key")], stream="s")
        await store.close()
    conn = sqlite3.connect(path)
    try:
        for sql in ("UPDATE ids_index SET position = 9", "DELETE FROM ids_index"):
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                conn.execute(sql)
        conn.execute("INSERT OR REPLACE INTO ids_index VALUES ('key', 9)")  # skipped
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):  # indexed id
            conn.execute("INSERT INTO events VALUES (2, 'z', 1, 'A', 1, '{}', '{}', 'key', 0)")
        conn.commit()
    finally:
        conn.close()
    assert ids_index(path) == {"key": a.position}


FORMAT_2 = """
CREATE TABLE xcore_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE events (
    position INTEGER PRIMARY KEY, stream TEXT NOT NULL, version INTEGER NOT NULL,
    type TEXT NOT NULL, schema INTEGER NOT NULL, data BLOB NOT NULL, meta BLOB NOT NULL,
    id TEXT NOT NULL, recorded_at REAL NOT NULL
);
CREATE TABLE streams_index (stream TEXT NOT NULL, version INTEGER NOT NULL,
    position INTEGER NOT NULL, PRIMARY KEY (stream, version)) WITHOUT ROWID;
CREATE UNIQUE INDEX events_id ON events (id);
CREATE TRIGGER events_append_only_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'the xcore event log is append-only'); END;
CREATE TRIGGER events_append_only_delete BEFORE DELETE ON events
BEGIN SELECT RAISE(ABORT, 'the xcore event log is append-only'); END;
CREATE TRIGGER events_append_only_insert BEFORE INSERT ON events
WHEN NEW.position <= (SELECT MAX(position) FROM events)
  OR EXISTS (SELECT 1 FROM events WHERE id = NEW.id)
  OR EXISTS (SELECT 1 FROM streams_index WHERE stream = NEW.stream AND version = NEW.version)
BEGIN SELECT RAISE(ABORT, 'the xcore event log is append-only'); END;
CREATE TABLE checkpoints (name TEXT PRIMARY KEY, position INTEGER NOT NULL);
CREATE TABLE snapshots (name TEXT PRIMARY KEY, position INTEGER NOT NULL,
    schema INTEGER NOT NULL, state BLOB NOT NULL);
INSERT INTO xcore_meta VALUES ('format', '2');
INSERT INTO xcore_meta VALUES ('indexed_upto', '20');
"""


def _format_2_log(path: Path, events: int) -> None:
    """A format-2 log as that version left it after a crash: indexed up to 20."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(FORMAT_2)
    for i in range(1, events + 1):
        stream, version = f"s{i % 3}", (i + 2) // 3
        conn.execute(
            "INSERT INTO events VALUES (?, ?, ?, 'A', 1, ?, ?, ?, 0)",
            (i, stream, version, orjson.dumps({"i": i}), Meta(id=f"k{i}").to_json(), f"k{i}"),
        )
        if i <= 20:
            conn.execute("INSERT INTO streams_index VALUES (?, ?, ?)", (stream, version, i))
    conn.commit()
    conn.close()


async def test_a_format_2_log_is_read_as_it_is_and_upgraded_when_written(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    _format_2_log(path, 30)
    with anyio.fail_after(60):
        reader = SQLiteStore(path, readonly=True)
        await reader.open()
        try:
            assert reader.format == 2
            assert [r.position for r in await reader.read(stream="s1")] == list(range(1, 31, 3))
            assert await reader.stream_version("s2") == 10
        finally:
            await reader.close()
        with open_log(path) as log:  # replay reads it by id through its own index
            assert log.by_id("k25") is not None and log.by_id("k25").position == 25  # type: ignore[union-attr]
            assert verify(log).ok  # its stream index checked, no id index to check

        store = SQLiteStore(path, accept_log_loss=True, allow_new_log=True, index_every=100)
        await store.open()
        try:
            assert store.format == FORMAT == 3
            assert store._writer is not None and store._writer.unindexed_ids == {}
            got = await store.append([ev(0, "k5"), ev(0, "k25")], stream="x")
            assert [r.position for r in got] == [5, 25]
            with pytest.raises(StoreError, match="already in the log"):
                await store.append([NewEvent("A", b"{}", Meta(id="k7"))], stream="x")
            [r] = await store.append([ev(31)], stream="s1", expected_version=10)
            assert (r.position, r.version) == (31, 11)
            assert [r.position for r in await store.read(stream="s1")][-2:] == [28, 31]
        finally:
            await store.close()
    conn = sqlite3.connect(path)
    try:
        names = {n for (n,) in conn.execute("SELECT name FROM sqlite_master")}
        assert "events_id" not in names and "ids_index" in names
        guard = conn.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'events_append_only_insert'"
        ).fetchone()[0]
        assert "ids_index" in guard
        assert conn.execute("SELECT COUNT(*) FROM ids_index").fetchone() == (31,)
        assert conn.execute("SELECT COUNT(*) FROM streams_index").fetchone() == (31,)
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("INSERT INTO events VALUES (40, 'q', 1, 'A', 1, '{}', '{}', 'k3', 0)")
    finally:
        conn.close()
    with open_log(path) as log:
        assert verify(log).ok


async def test_a_copy_to_sqlite_is_indexed_batch_by_batch(tmp_path: Path) -> None:
    """``xcore store copy`` writes each batch with its index rows and the mark: the copy
    opens with nothing to reload, its ids and versions guarded as a kernel's log."""
    from kernel.store.copy import copy_log

    src, dst = tmp_path / "a.db", tmp_path / "b.db"
    store = SQLiteStore(src)
    with anyio.fail_after(60):
        await store.open()
        try:
            for i in range(0, 50, 5):
                await store.append([ev(j) for j in range(i, i + 5)], stream=f"s{i % 3}")
            [keyed] = await store.append([ev(0, "key")], stream="k")
        finally:
            await store.close()
        report = await copy_log(str(src), str(dst), batch=7, out=io.StringIO())
        assert report.verified and report.copied == 51
    assert len(ids_index(dst)) == 51
    copy = SQLiteStore(dst)
    with anyio.fail_after(60):
        await copy.open()
        try:
            assert copy._writer is not None
            assert copy._writer.unindexed == [] and copy._writer.unindexed_ids == {}
            [again] = await copy.append([ev(1, "key")], stream="k")
            assert again.position == keyed.position == 51
        finally:
            await copy.close()


async def test_an_imported_slice_is_indexed_and_refuses_a_duplicate_id(tmp_path: Path) -> None:
    from replay.errors import ReplayError
    from replay.slices import export_slice, import_slice

    src = tmp_path / "a.db"
    store = SQLiteStore(src)
    with anyio.fail_after(60):
        await store.open()
        try:
            for i in range(5):
                await store.append([ev(i, f"key-{i}")], stream="s")
        finally:
            await store.close()
    jsonl = tmp_path / "slice.jsonl"
    with open_log(src) as log, jsonl.open("w") as out:
        export_slice(log, out)
    assert import_slice(jsonl, tmp_path / "b.db") == 5
    assert len(ids_index(tmp_path / "b.db")) == 5  # indexed whole: nothing to reload
    lines = jsonl.read_text().splitlines()
    twin = orjson.loads(lines[-1])
    twin["position"] += 1
    twin["version"] += 1
    jsonl.write_text("\n".join([*lines, orjson.dumps(twin).decode()]) + "\n")
    with pytest.raises(ReplayError, match="duplicate ids"):
        import_slice(jsonl, tmp_path / "c.db")
    assert not (tmp_path / "c.db").exists()


def wal_commits(path: Path) -> int:
    """Transactions in the WAL: frames that end a commit (a database size in their
    header), of the WAL's current generation (its salts)."""
    data = Path(f"{path}-wal").read_bytes()
    page = int.from_bytes(data[8:12], "big")
    salts = data[16:24]
    commits = 0
    for at in range(32, len(data) - 24, page + 24):
        if data[at + 8 : at + 16] != salts:
            break
        commits += int.from_bytes(data[at + 4 : at + 8], "big") != 0
    return commits


async def test_the_index_flush_rides_in_the_batch_transaction(tmp_path: Path) -> None:
    """Writing both indexes and moving the mark adds no transaction (no fsync) of its
    own: 10 lone appends over 3 flushes are 10 commits; a batch of 100 producers with
    flushes inside is one commit per batch."""
    path = tmp_path / "log.db"
    store = SQLiteStore(path, index_every=4)
    with anyio.fail_after(60):
        await store.open()
        try:
            await store.append([ev(0)], stream="s")
            before = wal_commits(path)
            for i in range(10):
                await store.append([ev(i)], stream="s")
            assert wal_commits(path) - before == 10
            assert len(ids_index(path)) == 8  # flushed at 4 and 8 (+ the first event)
            before = wal_commits(path)
            await asyncio.gather(*(store.append([ev(i)], stream=f"p{i}") for i in range(100)))
            batches = wal_commits(path) - before
            assert 1 <= batches < 100
            assert store._writer is not None
            assert len(ids_index(path)) + len(store._writer.unindexed_ids) == 111
        finally:
            await store.close()


async def test_fresh_ids_skip_the_probe_and_others_are_probed_against_the_bound(
    tmp_path: Path,
) -> None:
    """The index is probed only for an id that might be in it: a fresh id sorts after
    the greatest 32-character id indexed (the bound); an id of another length, or one at
    or below the bound, is probed and refused when indexed."""
    path = tmp_path / "log.db"
    store = SQLiteStore(path, index_every=3)
    with anyio.fail_after(60):
        await store.open()
        try:
            [short] = await store.append([ev(0, "short-key")], stream="s")
            [low] = await store.append([ev(0, "0" * 32)], stream="s")
            await store.append([ev(0)], stream="s")  # flush: all three indexed
            writer = store._writer
            assert writer is not None and writer.unindexed_ids == {}
            assert writer.ids_bound > "0" * 32 and len(writer.ids_bound) == 32
            probes: list[str] = []
            conn = store._write_conn
            assert conn is not None
            await conn.set_trace_callback(
                lambda sql: probes.append(sql) if "FROM ids_index" in sql else None
            )
            # a fresh id of the bound's millisecond may sort below it (its low bits are
            # random) and is rightly probed: the fresh ids below come from later ones
            while time.time_ns() // 1_000_000 <= int(writer.ids_bound[:12], 16):
                await anyio.sleep(0.001)
            for i in range(2):
                await store.append([ev(i)], stream="s")
            assert probes == []  # fresh ids: no read of the index
            for taken in (short.meta.id, low.meta.id):
                with pytest.raises(StoreError, match="already in the log"):
                    await store.append([NewEvent("A", b"{}", Meta(id=taken))], stream="s")
            assert probes
            await conn.set_trace_callback(None)
        finally:
            await store.close()
    # the bound is read from the index at open, the stored one a hint only: a wrong or
    # missing hint cannot let an indexed id through
    newest = max(ids_index(path), key=lambda i: (len(i) == 32, i))
    for hint in ("", "0" * 32, None):
        conn = sqlite3.connect(path)
        if hint is None:
            conn.execute("DELETE FROM xcore_meta WHERE key = 'ids_bound'")
        else:
            conn.execute("UPDATE xcore_meta SET value = ? WHERE key = 'ids_bound'", (hint,))
        conn.commit()
        conn.close()
        store = SQLiteStore(path, index_every=3)
        with anyio.fail_after(60):
            await store.open()
            try:
                assert store._writer is not None and store._writer.ids_bound == newest
                with pytest.raises(StoreError, match="already in the log"):
                    await store.append([NewEvent("A", b"{}", Meta(id=newest))], stream="s")
            finally:
                await store.close()


async def test_a_batch_with_nothing_to_write_keeps_the_unindexed_end(tmp_path: Path) -> None:
    """A long unindexed end (reloaded after a crash, longer than ``index_every``) is
    indexed by the next batch that writes; a batch of repeats only (nothing to write)
    must not drop it from memory, or it would never be indexed."""
    path = tmp_path / "log.db"
    script = textwrap.dedent(
        f"""
        import asyncio, os, orjson
        from kernel.events import Meta, NewEvent
        from kernel.store import SQLiteStore

        async def main():
            store = SQLiteStore({str(path)!r}, index_every=100)
            await store.open()
            for i in range(6):
                await store.append([NewEvent("A", orjson.dumps({{"i": i}}),
                                    Meta(id="key-" + str(i)), explicit_id=True)], stream="s")
            os._exit(0)  # no close: nothing indexed

        asyncio.run(main())
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    store = SQLiteStore(path, index_every=3, accept_log_loss=True)
    with anyio.fail_after(60):
        await store.open()
        try:
            [again] = await store.append([ev(0, "key-1")], stream="s")  # writes nothing
            assert again.position == 2
            await store.append([ev(7)], stream="s")  # flushes the end with it
            assert sorted(ids_index(path).values()) == list(range(1, 8))
            assert [r.version for r in await store.read(stream="s")] == list(range(1, 8))
        finally:
            await store.close()


async def test_an_id_that_is_not_text_fails_only_its_caller(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "log.db")
    with anyio.fail_after(60):
        await store.open()
        try:
            await store.append([ev(0)], stream="x")  # a stream the writer knows: lone path
            for odd in (None, 5):
                alone, other, many = await asyncio.gather(
                    store.append([NewEvent("A", b"{}", Meta(id=odd))], stream="x"),  # type: ignore[arg-type]
                    store.append([ev(1)], stream="y"),
                    store.append([ev(2), NewEvent("A", b"{}", Meta(id=odd))], stream="z"),  # type: ignore[arg-type]
                    return_exceptions=True,
                )
                for bad in (alone, many):
                    assert isinstance(bad, StoreError) and "must be text" in str(bad)
                assert not isinstance(other, BaseException)
                with pytest.raises(StoreError, match="must be text"):
                    await store.append([NewEvent("A", b"{}", Meta(id=odd))], stream="x")  # type: ignore[arg-type]
            assert await store.read(stream="z") == []
            assert [r.stream for r in await store.read()] == ["x", "y", "y"]
        finally:
            await store.close()


async def test_verify_reports_an_index_that_disagrees_with_the_log(tmp_path: Path) -> None:
    """The lagged indexes are the log's own tables: an outside writer can insert rows
    into them (their triggers refuse updates and deletes only); ``verify`` checks each
    row against the event it names, and each indexed event against its rows."""
    path = tmp_path / "log.db"
    store = SQLiteStore(path)
    with anyio.fail_after(60):
        await store.open()
        try:
            for i in range(4):
                await store.append([ev(i)], stream="s")
        finally:
            await store.close()
    with open_log(path) as log:
        assert verify(log).ok
    conn = sqlite3.connect(path)
    try:
        conn.execute("INSERT INTO ids_index VALUES ('forged', 2)")
        conn.execute("INSERT INTO streams_index VALUES ('other', 1, 3)")
        conn.execute("UPDATE xcore_meta SET value = '9' WHERE key = 'indexed_upto'")
        conn.commit()
    finally:
        conn.close()
    with open_log(path) as log:
        report = verify(log)
    [check] = [c for c in report.checks if c.name.startswith("the log's indexes")]
    assert [(d.kind, d.position) for d in check.defects] == [("index", 2), ("index", 3)]
    assert "forged" in check.defects[0].message and not report.ok


@pytest.mark.parametrize(
    "bad",
    [
        NewEvent("\ud800", b"{}", Meta()),  # a type that is not valid text
        NewEvent("A", b"{}", Meta(), schema=2**70),  # a schema over 64 bits
        NewEvent("A", b"{}", Meta(id="\ud800x"), explicit_id=True),  # an id, likewise
        NewEvent("A", b"{}", Meta(id=["a"]), explicit_id=True),  # type: ignore[arg-type]
        NewEvent("A", b"{}", Meta(id=["a"])),  # type: ignore[arg-type]
    ],
    ids=["type", "schema", "explicit-id", "list-id", "plain-list-id"],
)
async def test_a_value_sqlite_cannot_bind_fails_its_append_alone(
    tmp_path: Path, bad: NewEvent
) -> None:
    """A value the sqlite3 module cannot bind failed every append of its batch with a
    raw "write failed"; and when it came after a first chunk of 500 rows, that chunk
    stayed in the open transaction, which the close's index flush then committed: events
    every caller had been told were not written were in the log."""
    path = tmp_path / "log.db"
    store = SQLiteStore(path)
    with anyio.fail_after(60):
        await store.open()
        try:
            await store.append([ev(0)], stream="x")
            results = await asyncio.gather(
                *[store.append([ev(i)], stream=f"g{i}") for i in range(3)],
                store.append([*[ev(i) for i in range(600)], bad], stream="bad"),
                *[store.append([ev(i)], stream=f"h{i}") for i in range(3)],
                return_exceptions=True,
            )
            refused = results.pop(3)
            assert isinstance(refused, StoreError) and "'bad'" in str(refused)
            assert not any(isinstance(r, BaseException) for r in results), results
            [lone] = await asyncio.gather(store.append([bad], stream="bad"), return_exceptions=True)
            assert isinstance(lone, StoreError)
            [after] = await store.append([ev(1)], stream="x")
            assert after.position == 8
        finally:
            await store.close()
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("SELECT MAX(position) FROM events").fetchone() == (8,)
            assert conn.execute("SELECT COUNT(*) FROM events WHERE stream = 'bad'").fetchone() == (
                0,
            )
        finally:
            conn.close()


async def test_an_id_above_every_fresh_one_does_not_make_every_append_probe(
    tmp_path: Path,
) -> None:
    """A caller's 32-character id that sorts above every fresh id (``uuid4().hex``
    beginning with 1 to f, ``"z" * 32``) raised the bound above every fresh id to come:
    every later append probed the index, for good (the bound is stored). Such ids stay
    above the ceiling: they never raise the bound, and are always probed themselves."""
    path = tmp_path / "log.db"
    high = ["f" * 32, "z" * 32, "é" * 32]
    for run in range(2):  # and again after a restart: the bound read at open
        store = SQLiteStore(path, index_every=4)
        with anyio.fail_after(60):
            await store.open()
            try:
                if run == 0:
                    for i, key in enumerate(high):
                        await store.append([ev(i, key)], stream="s")
                    await store.append([ev(9)], stream="s")  # flush: indexed
                writer = store._writer
                assert writer is not None and writer.unindexed_ids == {}
                assert writer.ids_bound < "1"  # among fresh ids (time first)
                # A fresh id drawn in the bound's own millisecond sorts below it half the
                # time (its low bits are random) and is rightly probed: draw them later.
                bound_ms = int(writer.ids_bound[:12], 16)
                while time.time_ns() // 1_000_000 <= bound_ms:
                    await anyio.sleep(0.001)
                probes: list[str] = []
                conn = store._write_conn
                assert conn is not None
                await conn.set_trace_callback(
                    lambda sql, probes=probes: (
                        probes.append(sql) if "FROM ids_index" in sql else None
                    )
                )
                for i in range(2):
                    await store.append([ev(i)], stream="s")
                assert probes == []  # fresh ids: no read of the index
                for key in high:
                    with pytest.raises(StoreError, match="already in the log"):
                        await store.append([NewEvent("A", b"{}", Meta(id=key))], stream="t")
                    [again] = await store.append([ev(0, key)], stream="t")
                    assert again.stream == "s"
                assert probes
                await conn.set_trace_callback(None)
            finally:
                await store.close()


async def test_a_row_slipped_into_an_index_answers_for_no_other_event(tmp_path: Path) -> None:
    """Both indexes take outside inserts of a row for an event that is not there (no
    trigger can check it cheaply). Such a row made an explicit append of its id return
    another event and store nothing, a read of its stream return another stream's
    event, and ``replay why``'s lookup by id another event; now each checks the event it
    reads has that id or stream, and ``replay verify`` reports the rows."""
    path = tmp_path / "log.db"
    store = SQLiteStore(path, index_every=4)
    with anyio.fail_after(60):
        await store.open()
        try:
            for i in range(5):
                await store.append([ev(i)], stream="other")
            conn = sqlite3.connect(path)
            conn.execute("INSERT INTO ids_index VALUES ('ghost', 3)")
            conn.execute("INSERT INTO streams_index VALUES ('mine', 1, 2)")
            conn.commit()
            conn.close()
            # refused (the id is indexed), and said so: not another event returned
            with pytest.raises(StoreError, match="'ghost' is already in the log"):
                await store.append([ev(9, "ghost")], stream="mine")
        finally:
            await store.close()
        reader = SQLiteStore(path, readonly=True)
        await reader.open()
        try:
            assert {r.stream for r in await reader.read(stream="mine")} <= {"mine"}
        finally:
            await reader.close()
    with open_log(path) as log:
        found = log.by_id("ghost")
        assert found is None or found.meta.id == "ghost"
        assert not verify(log).ok


async def test_a_refused_id_beside_repeats_and_conflicts_fails_only_its_own_write(
    tmp_path: Path,
) -> None:
    """A batch where one write reuses an indexed id (refused by the probe) and the others
    write no row (an idempotent repeat, a version conflict): the others got that write's
    "already in the log" error, as the retry one write at a time counted only the
    writes with rows."""
    from kernel.errors import ConcurrencyError
    from kernel.store.base import StreamWrite

    path = tmp_path / "log.db"
    store = SQLiteStore(path, index_every=2)
    with anyio.fail_after(60):
        await store.open()
        try:
            [first] = await store.append([ev(0, "k1")], stream="a")
            [taken] = await store.append([ev(1)], stream="b")  # flush: both indexed
            assert store._writer is not None and store._writer.unindexed_ids == {}
            repeat, reused, conflict = await store.append_many(
                [
                    StreamWrite("a", [ev(0, "k1")]),
                    StreamWrite("e", [NewEvent("A", b"{}", Meta(id=taken.meta.id))]),
                    StreamWrite("b", [ev(2)], expected_version=0),
                ]
            )
            assert not isinstance(repeat, BaseException)
            assert [r.position for r in repeat] == [first.position]
            assert isinstance(reused, StoreError) and "already in the log" in str(reused)
            assert isinstance(conflict, ConcurrencyError)
            assert await store.last_position() == 2
        finally:
            await store.close()


async def test_an_id_reused_without_explicit_in_one_batch_is_refused(tmp_path: Path) -> None:
    """Two writes of one batch with the same id, the second not marked explicit: the
    second returned the first's event (another stream's) as if it were a repeat, where
    in two batches it is refused ("already in the log")."""
    from kernel.store.base import StreamWrite

    store = SQLiteStore(tmp_path / "log.db")
    with anyio.fail_after(60):
        await store.open()
        try:
            first, second = await store.append_many(
                [
                    StreamWrite("c", [NewEvent("A", b"{}", Meta(id="k2"))]),
                    StreamWrite("d", [NewEvent("A", b"{}", Meta(id="k2"))]),
                ]
            )
            assert not isinstance(first, BaseException) and first[0].stream == "c"
            assert isinstance(second, StoreError) and "already in the log" in str(second)
            [again] = await store.append_many([StreamWrite("d", [ev(0, "k2")])])
            assert not isinstance(again, BaseException) and again[0].stream == "c"
        finally:
            await store.close()
