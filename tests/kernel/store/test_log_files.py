"""The log's edges: nothing is lost without a loud error.

A clean stop leaves a self-contained file; a lost log is not replaced by an empty one in
silence; a damaged write-ahead log is kept and a log that lost acknowledged events is
refused; backups are online and restores verified; files are the owner's only.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import stat
import threading
from pathlib import Path

import anyio
import pytest

from kernel.errors import StoreCorrupt, StoreError, StoreLocked
from kernel.events import NewEvent
from kernel.store import SQLiteStore
from kernel.store.backup import backup, restore


def ev(i: int) -> NewEvent:
    return NewEvent.raw("Counted", {"i": i, "pad": "p" * 200})


async def make_log(path: Path, n: int) -> None:
    store = SQLiteStore(path)
    await store.open()
    await store.append([ev(i) for i in range(n)], stream="s")
    await store.close()


async def positions(path: Path, **options: bool) -> list[int]:
    store = SQLiteStore(path, **options)  # type: ignore[arg-type]
    await store.open()
    try:
        return [r.position for r in await store.read()]
    finally:
        await store.close()


async def test_a_clean_close_leaves_a_self_contained_log(tmp_path: Path) -> None:
    path = tmp_path / "var" / "events.db"
    store = SQLiteStore(path)
    await store.open()
    reader = SQLiteStore(path, readonly=True)  # another reader open meanwhile
    await reader.open()
    await store.append([ev(i) for i in range(300)], stream="s")
    await reader.read()
    await reader.close()
    await store.close()
    wal = path.with_name("events.db-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    # copying the file alone (as most backups would) copies the whole log
    copy = tmp_path / "copy" / "events.db"
    copy.parent.mkdir()
    shutil.copyfile(path, copy)
    assert await positions(copy) == list(range(1, 301))


@pytest.mark.parametrize("state", ["missing", "empty"])
async def test_a_lost_log_in_a_used_folder_is_refused(tmp_path: Path, state: str) -> None:
    path = tmp_path / "events.db"
    await make_log(path, 3)
    if state == "missing":
        path.unlink()
    else:
        path.write_bytes(b"")
    with pytest.raises(StoreCorrupt, match=f"is {state} but this data folder was used") as err:
        await SQLiteStore(path).open()
    assert "position 3" in str(err.value) and "allow_new_log" in str(err.value)
    # refused without creating anything, and the lock is released
    assert (path.exists() and path.stat().st_size == 0) == (state == "empty")
    assert await positions(path, allow_new_log=True) == []


async def test_a_wal_without_its_log_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    path.with_name("events.db-wal").write_bytes(b"\x37\x7f\x06\x82" + b"\0" * 60)
    with pytest.raises(StoreCorrupt, match="write-ahead log events.db-wal exists"):
        await SQLiteStore(path).open()
    assert not path.exists()
    # the explicit flag starts a new log, keeping the stray WAL aside until a clean stop
    store = SQLiteStore(path, allow_new_log=True)
    await store.open()
    assert path.with_name("events.db-wal.unclean").exists()
    assert await store.last_position() == 0
    await store.close()


async def test_another_sign_of_prior_use_is_enough(tmp_path: Path) -> None:
    (tmp_path / "admin-token.sha256").write_text("00")
    with pytest.raises(StoreCorrupt, match="admin-token.sha256"):
        await SQLiteStore(tmp_path / "events.db").open()
    # a fresh folder is fine
    assert await positions(tmp_path / "fresh" / "events.db") == []


async def crashed_copy(tmp_path: Path, n: int) -> Path:
    """A data folder as a crash leaves it: the log, its WAL (holding the events) and the
    mark of the last acknowledged position, copied while the writer is open."""
    live = tmp_path / "live" / "events.db"
    store = SQLiteStore(live, mark_interval=0.01)
    await store.open()
    await store.append([ev(i) for i in range(n)], stream="s")
    with anyio.fail_after(20):
        while store.files.read_mark() != store.files.read_mark() or (
            (m := store.files.read_mark()) is None or m.position < n
        ):
            await asyncio.sleep(0.01)
    crash = tmp_path / "crash"
    crash.mkdir()
    for name in ("events.db", "events.db-wal", "events.db.mark"):
        shutil.copyfile(live.with_name(name), crash / name)
    await store.close()
    return crash / "events.db"


async def test_a_log_killed_during_a_checkpoint_opens_with_every_event(
    tmp_path: Path,
) -> None:
    """SIGKILL during a checkpoint, after it copied page 1 (the pages go in ascending
    order: the header, announcing the grown size, first) and before the file grew: the
    missing pages are in the WAL and SQLite recovers them. The log was refused as
    truncated ("restore it from a copy"), in a read-only open of a live log too (one
    in another process's checkpoint)."""
    path = await crashed_copy(tmp_path, 300)
    wal = path.with_name("events.db-wal").read_bytes()
    page_size = int.from_bytes(wal[8:12], "big")
    page1 = None
    at = 32  # the WAL header, then frames: a 24-byte header (page number first), a page
    while at + 24 + page_size <= len(wal):
        if int.from_bytes(wal[at : at + 4], "big") == 1:
            page1 = wal[at + 24 : at + 24 + page_size]
        at += 24 + page_size
    assert page1 is not None
    with path.open("r+b") as f:
        f.write(page1)
    assert int.from_bytes(page1[28:32], "big") * page_size > path.stat().st_size
    copy = tmp_path / "ro"
    copy.mkdir()
    for name in ("events.db", "events.db-wal"):
        shutil.copyfile(path.with_name(name), copy / name)
    with anyio.fail_after(60):
        ro = SQLiteStore(copy / "events.db", readonly=True)
        await ro.open()
        try:
            assert [r.position for r in await ro.read()] == list(range(1, 301))
        finally:
            await ro.close()
        store = SQLiteStore(path)
        await store.open()
        try:
            assert [r.position for r in await store.read()] == list(range(1, 301))
        finally:
            await store.close()


async def test_an_unclean_stop_keeps_the_wal_and_counts_what_it_recovered(
    tmp_path: Path,
) -> None:
    path = await crashed_copy(tmp_path, 50)
    wal = path.with_name("events.db-wal").read_bytes()
    store = SQLiteStore(path)
    await store.open()
    try:
        assert store.recovery is not None
        assert store.recovery["recovered_from_wal"] == 50
        assert store.recovery["last_position"] == 50
        kept = path.with_name("events.db-wal.unclean")
        assert kept.read_bytes() == wal  # the WAL exactly as found
        assert len(await store.read()) == 50
    finally:
        await store.close()
    assert not kept.exists()  # dropped at the next clean stop
    again = SQLiteStore(path)
    await again.open()
    assert again.recovery is None
    await again.close()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
async def test_a_damaged_wal_that_lost_acknowledged_events_is_refused(
    tmp_path: Path, damage: str
) -> None:
    path = await crashed_copy(tmp_path, 200)
    wal = path.with_name("events.db-wal")
    data = bytearray(wal.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        mid = len(data) // 2
        data[mid : mid + 64] = b"\xff" * 64
    wal.write_bytes(bytes(data))
    damaged = bytes(data)
    with pytest.raises(StoreCorrupt, match="200 was acknowledged") as err:
        await SQLiteStore(path).open()
    assert "events.db-wal.unclean" in str(err.value)
    assert path.with_name("events.db-wal.unclean").read_bytes() == damaged
    # nothing was appended over the lost positions; the operator may accept the loss
    store = SQLiteStore(path, accept_log_loss=True)
    await store.open()
    try:
        last = await store.last_position()
        assert last < 200
        [r] = await store.append([ev(-1)], stream="t")
        assert r.position == last + 1
    finally:
        await store.close()


async def test_backup_is_online_and_restore_is_verified(tmp_path: Path) -> None:
    path = tmp_path / "var" / "events.db"
    store = SQLiteStore(path)
    await store.open()
    await store.append([ev(i) for i in range(100)], stream="s")
    stop = asyncio.Event()

    async def keep_appending() -> None:
        while not stop.is_set():
            await store.append([ev(0)], stream="busy")

    writer = asyncio.create_task(keep_appending())
    try:
        with anyio.fail_after(60):
            copied = await backup(path, tmp_path / "backup.db")
    finally:
        stop.set()
        await writer
    assert copied.events == copied.last_position >= 100
    with pytest.raises(StoreLocked):  # never over a log a kernel holds
        await restore(tmp_path / "backup.db", path, force=True)
    await store.close()

    with pytest.raises(StoreError, match="already holds a log"):
        await restore(tmp_path / "backup.db", path)
    done = await restore(tmp_path / "backup.db", path, force=True)
    assert done.replaced is not None and done.replaced.exists()
    # the restored log is older than the mark the live one left: the mark follows it
    assert await positions(path) == list(range(1, copied.last_position + 1))

    fresh = tmp_path / "elsewhere" / "events.db"
    await restore(tmp_path / "backup.db", fresh)
    assert len(await positions(fresh)) == copied.events

    (tmp_path / "bad.db").write_bytes(b"SQLite format 3\x00" + b"\x01" * 4000)
    with pytest.raises(StoreCorrupt):
        await restore(tmp_path / "bad.db", tmp_path / "third" / "events.db")
    assert not (tmp_path / "third" / "events.db").exists()


async def test_the_log_and_its_folder_are_the_owners_only(tmp_path: Path) -> None:
    folder = tmp_path / "var"
    store = SQLiteStore(folder / "events.db")
    await store.open()
    try:
        await store.append([ev(1)], stream="s")
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        for f in folder.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f.name
        assert {f.name for f in folder.iterdir()} >= {"events.db", "events.db-wal"}
    finally:
        await store.close()


async def test_a_read_only_open_creates_no_files(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    await make_log(path, 5)
    before = sorted(os.listdir(tmp_path))
    reader = SQLiteStore(path, readonly=True)
    await reader.open()
    assert len(await reader.read()) == 5
    await reader.close()
    assert sorted(os.listdir(tmp_path)) == before
    assert "events.db-wal" not in before and "events.db-shm" not in before


async def test_a_failed_open_releases_everything(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    await make_log(path, 5)
    # an intact SQLite file whose events table is gone
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE events")
    conn.commit()
    conn.close()
    threads = set(threading.enumerate())
    for _ in range(2):  # the second attempt is not StoreLocked: the lock was released
        with pytest.raises(StoreCorrupt, match="not an xcore event log"):
            await SQLiteStore(path).open()
        with pytest.raises(StoreCorrupt, match="damaged"):
            await SQLiteStore(path, readonly=True).open()
    await asyncio.sleep(0.1)
    leftover = [
        t
        for t in set(threading.enumerate()) - threads
        if t.is_alive() and "connection_worker" in t.name  # aiosqlite's connection threads
    ]
    assert leftover == [], "a connection's thread was left running"


async def test_odd_file_names_and_a_fifo(tmp_path: Path) -> None:
    odd = tmp_path / "we?ird #dir%20" / "ev ents?.db"
    await make_log(odd, 3)
    assert await positions(odd) == [1, 2, 3]
    reader = SQLiteStore(odd, readonly=True)
    await reader.open()
    assert len(await reader.read()) == 3
    await reader.close()
    copied = await backup(odd, odd.with_name("b?k.db"))
    assert copied.events == 3
    fifo = tmp_path / "fifo.db"
    os.mkfifo(fifo)
    with anyio.fail_after(10):  # refused at once, never blocked reading the pipe
        for readonly in (False, True):
            with pytest.raises(StoreCorrupt, match="not a regular file"):
                await SQLiteStore(fifo, readonly=readonly).open()


async def test_a_read_only_store_of_an_idle_log_sees_a_writer_s_later_appends(
    tmp_path: Path,
) -> None:
    path = tmp_path / "events.db"
    await make_log(path, 5)
    reader = SQLiteStore(path, readonly=True)  # opened while no one writes: immutable
    await reader.open()
    writer = SQLiteStore(path)
    try:
        assert len(await reader.read()) == 5
        await writer.open()
        await writer.append([NewEvent.raw("Later", {"i": i}) for i in range(3)], stream="later")
        await writer.save_checkpoint("cp", 8)
        # every kind of read sees them, not only last_position()
        assert [r.position for r in await reader.read(stream="later")] == [6, 7, 8]
        assert len(await reader.read()) == 8
        assert await reader.stream_version("later") == 3
        assert await reader.load_checkpoint("cp") == 8
    finally:
        await writer.close()
        await reader.close()
