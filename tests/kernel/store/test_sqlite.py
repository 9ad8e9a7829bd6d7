"""What only the SQLite backend promises: durability, one writer, clear errors on bad files."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest

from kernel.errors import StoreCorrupt, StoreError, StoreLocked
from kernel.events import NewEvent
from kernel.store import SQLiteStore


def ev(i: int) -> NewEvent:
    return NewEvent.raw("Counted", {"i": i})


async def test_events_survive_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    store = SQLiteStore(path)
    await store.open()
    await store.append([ev(1), ev(2)], stream="s")
    await store.save_checkpoint("sub", 2)
    await store.close()

    again = SQLiteStore(path)
    await again.open()
    try:
        assert [r.data["i"] for r in await again.read()] == [1, 2]
        assert await again.stream_version("s") == 2
        assert await again.load_checkpoint("sub") == 2
        [r] = await again.append([ev(3)], stream="s", expected_version=2)
        assert (r.position, r.version) == (3, 3)
    finally:
        await again.close()


async def test_a_second_writer_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    first = SQLiteStore(path)
    await first.open()
    try:
        second = SQLiteStore(path)
        with pytest.raises(StoreLocked, match="already open for writing") as err:
            await second.open()
        assert str(path) in str(err.value)
        assert str(os.getpid()) in str(err.value)
        # the refused opener changed nothing: the first keeps writing
        await first.append([ev(1)], stream="s")
    finally:
        await first.close()
    # once released, the file can be opened again
    third = SQLiteStore(path)
    await third.open()
    assert await third.last_position() == 1
    await third.close()


async def test_a_writer_in_another_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import asyncio, sys
                from kernel.store import SQLiteStore
                async def main():
                    s = SQLiteStore({str(path)!r}); await s.open()
                    print("open", flush=True); sys.stdin.readline(); await s.close()
                asyncio.run(main())
                """
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(StoreLocked, match=str(holder.pid)):
            await SQLiteStore(path).open()
    finally:
        holder.communicate("\n", timeout=20)


async def test_a_file_that_is_not_sqlite_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    path.write_text("name,age\nada,36\n" * 20)
    with pytest.raises(StoreCorrupt, match="not an SQLite database"):
        await SQLiteStore(path).open()
    assert path.read_text().startswith("name,age")  # untouched


async def test_a_truncated_log_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    store = SQLiteStore(path)
    await store.open()
    await store.append([NewEvent.raw("Big", {"blob": "x" * 3000}) for _ in range(200)], stream="s")
    await store.close()  # checkpoints the WAL into the main file
    # the events are in the file itself (not in a -wal left beside it): cutting the file
    # in half cuts the events, which the header's page count exposes
    assert not path.with_name("log.db-wal").exists()
    size = path.stat().st_size
    assert size > 200 * 3000
    with path.open("r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(StoreCorrupt, match="truncated"):
        await SQLiteStore(path).open()
    with pytest.raises(StoreCorrupt, match="truncated"):
        await SQLiteStore(path, readonly=True).open()


async def test_an_unrelated_sqlite_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreCorrupt, match="users"):
        await SQLiteStore(path).open()


async def test_a_full_disk_fails_the_append_loudly_and_writes_nothing(tmp_path: Path) -> None:
    # max_page_count makes SQLite answer exactly as on a full disk (SQLITE_FULL).
    path = tmp_path / "log.db"
    store = SQLiteStore(path, max_page_count=40)
    await store.open()
    try:
        await store.append([ev(0)], stream="s")
        big = [NewEvent.raw("Big", {"blob": "x" * 4000}) for _ in range(100)]
        with pytest.raises(StoreError, match="disk is full"):
            await store.append(big, stream="s")
        assert await store.last_position() == 1
        assert [r.position for r in await store.read()] == [1]
        # small appends still fit and stay gapless after the failure
        [r] = await store.append([ev(2)], stream="s")
        assert (r.position, r.version) == (2, 2)
    finally:
        await store.close()
    reopened = SQLiteStore(path)
    await reopened.open()
    assert [r.data.get("i") for r in await reopened.read()] == [0, 2]
    await reopened.close()


async def test_the_log_is_append_only(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    store = SQLiteStore(path)
    await store.open()
    await store.append([ev(1)], stream="s")
    await store.close()
    conn = sqlite3.connect(path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("UPDATE events SET type = 'Forged'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM events")
    conn.close()


async def test_a_read_only_reader_follows_a_live_writer(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    writer = SQLiteStore(path)
    await writer.open()
    reader = SQLiteStore(path, readonly=True)
    try:
        await writer.append([ev(1)], stream="s")
        await reader.open()
        await writer.append([ev(2)], stream="s")
        assert await reader.last_position() == 2
        assert [r.data["i"] for r in await reader.read()] == [1, 2]
        with pytest.raises(StoreError, match="read-only"):
            await reader.append([ev(3)], stream="s")
    finally:
        await reader.close()
        await writer.close()


async def test_read_only_open_of_a_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no such event log"):
        await SQLiteStore(tmp_path / "nope.db", readonly=True).open()
    assert not (tmp_path / "nope.db").exists()


def test_an_unknown_synchronous_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="synchronous must be"):
        SQLiteStore(tmp_path / "log.db", synchronous="OFF")  # type: ignore[arg-type]


PRODUCER = """
import asyncio, sys
from kernel.events import NewEvent
from kernel.store import SQLiteStore

async def producer(store, n):
    i = 0
    while True:
        i += 1
        [r] = await store.append([NewEvent.raw("Tick", {"p": n, "i": i})], stream=f"p{n}")
        sys.stdout.write(f"{r.position} {store._writer.inline_commits}\\n")
        sys.stdout.flush()

async def main():
    # lone commits stay in the loop's thread however slow a loaded disk syncs
    store = SQLiteStore(sys.argv[1], inline_limit=10.0)
    await store.open()
    await asyncio.gather(*(producer(store, n) for n in range(int(sys.argv[2]))))

asyncio.run(main())
"""


@pytest.mark.parametrize("producers", [8, 1])
async def test_an_acknowledged_append_survives_kill_9(tmp_path: Path, producers: int) -> None:
    """Append from a subprocess, SIGKILL it mid-stream: every acknowledged event is there.
    With one producer, most appends commit in its own task (one autocommitted INSERT
    each, the loop's turn skipped within the hold)."""
    path = tmp_path / "log.db"
    script = tmp_path / "producer.py"
    script.write_text(PRODUCER)
    proc = await anyio.open_process([sys.executable, str(script), str(path), str(producers)])
    acked: list[int] = []
    inline = 0
    assert proc.stdout is not None
    buffer = b""
    with anyio.fail_after(60):
        while len(acked) < 3000:
            chunk = await proc.stdout.receive()
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if line:
                    position, inline_commits = line.split()
                    acked.append(int(position))
                    inline = int(inline_commits)
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    # drain what the process acknowledged before it died
    try:
        with anyio.fail_after(5):
            async for chunk in proc.stdout:
                buffer += chunk
    except (anyio.EndOfStream, anyio.ClosedResourceError):
        pass
    for line in buffer.split(b"\n"):
        parts = line.split()
        if len(parts) == 2 and all(p.isdigit() for p in parts):
            acked.append(int(parts[0]))
    await proc.aclose()
    if producers == 1:
        assert inline > len(acked) // 2, f"{inline} of {len(acked)} appends inline"

    store = SQLiteStore(path)
    await store.open()
    try:
        positions = [r.position for r in await store.read()]
        assert positions == list(range(1, len(positions) + 1)), "positions must be gapless"
        assert set(acked) <= set(positions), "an acknowledged event was lost"
        assert len(positions) >= len(acked)
    finally:
        await store.close()
