"""``xcore store copy``: SQLite <-> PostgreSQL, verified, resumable, refusing other logs."""

from __future__ import annotations

import io
from pathlib import Path

import anyio
import pytest

from kernel.cli import main
from kernel.errors import XcoreError
from kernel.events import NewEvent, Recorded
from kernel.store.copy import copy_log
from kernel.store.postgres import PostgresStore
from kernel.store.sqlite import SQLiteStore

pytestmark = pytest.mark.postgres


async def fill(path: Path, start: int, count: int) -> list[Recorded]:
    store = SQLiteStore(path)
    await store.open()
    try:
        for i in range(start, start + count, 10):
            await store.append(
                [NewEvent.raw("Noted", {"i": j, "text": "é\u0000x"}) for j in range(i, i + 10)],
                stream=f"s{i % 7}",
            )
        return await store.read()
    finally:
        await store.close()


def same(a: list[Recorded], b: list[Recorded]) -> None:
    assert [(r.position, r.stream, r.version, r.type, r.data, r.meta.id) for r in a] == [
        (r.position, r.stream, r.version, r.type, r.data, r.meta.id) for r in b
    ]
    assert [r.recorded_at for r in a] == [r.recorded_at for r in b]


async def read_pg(dsn: str) -> list[Recorded]:
    store = PostgresStore(dsn)
    await store.open()
    try:
        return await store.read()
    finally:
        await store.close()


async def test_sqlite_to_postgres_and_back_is_exact(tmp_path: Path, pg_dsn: str) -> None:
    src = tmp_path / "a.db"
    original = await fill(src, 0, 1200)
    out = io.StringIO()
    with anyio.fail_after(120):
        report = await copy_log(str(src), pg_dsn, batch=250, out=out)
        assert report.verified and report.copied == 1200 and report.already == 0
        same(await read_pg(pg_dsn), original)
        back = tmp_path / "back.db"
        report = await copy_log(pg_dsn, str(back), batch=333, out=out)
        assert report.verified and report.copied == 1200
    store = SQLiteStore(back, readonly=True)
    await store.open()
    try:
        same(await store.read(), original)
    finally:
        await store.close()
    assert "1200/1200" in out.getvalue()


async def test_an_interrupted_copy_resumes(tmp_path: Path, pg_dsn: str) -> None:
    src = tmp_path / "a.db"
    await fill(src, 0, 300)
    with anyio.fail_after(120):
        first = await copy_log(str(src), pg_dsn, out=io.StringIO())
        assert first.copied == 300
        # the source went on; the destination holds its first 300 events
        everything = await fill(src, 300, 200)
        out = io.StringIO()
        second = await copy_log(str(src), pg_dsn, out=out)
        assert (second.already, second.copied, second.verified) == (300, 200, True)
        assert "resuming after position 300" in out.getvalue()
        same(await read_pg(pg_dsn), everything)


async def test_a_destination_holding_another_log_is_refused(tmp_path: Path, pg_dsn: str) -> None:
    src, other = tmp_path / "a.db", tmp_path / "other.db"
    await fill(src, 0, 50)
    await fill(other, 1000, 20)
    with anyio.fail_after(60):
        await copy_log(str(other), pg_dsn, out=io.StringIO())
        with pytest.raises(XcoreError, match="holds a different log"):
            await copy_log(str(src), pg_dsn, out=io.StringIO())
        assert len(await read_pg(pg_dsn)) == 20  # nothing written
        bigger = tmp_path / "bigger.db"
        await fill(bigger, 0, 100)
        with pytest.raises(XcoreError, match="more than"):
            await copy_log(str(src), str(bigger), out=io.StringIO())


async def test_the_command_line_copies_and_verifies(
    tmp_path: Path, pg_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "a.db"
    await fill(src, 0, 40)
    # the command runs its own event loop: in a thread, as from a shell
    assert await anyio.to_thread.run_sync(main, ["store", "copy", str(src), pg_dsn]) == 0
    printed = capsys.readouterr().out
    assert "copied 40 events" in printed and "verified 40 events" in printed
    missing = ["store", "copy", str(tmp_path / "missing.db"), pg_dsn]
    assert await anyio.to_thread.run_sync(main, missing) == 2  # a store error
    assert "no such event log" in capsys.readouterr().err


@pytest.mark.parametrize("to", ["postgres", "sqlite"])
async def test_a_source_with_a_hole_is_refused_at_the_hole(
    tmp_path: Path, pg_dsn: str, to: str
) -> None:
    """A source whose event 7 was deleted by hand: to PostgreSQL the copy died with a
    driver traceback; to SQLite it 'verified 20 events' and left a log with a hole."""
    import sqlite3

    src = tmp_path / "damaged.db"
    await fill(src, 0, 20)
    db = sqlite3.connect(src)
    db.execute("DROP TRIGGER events_append_only_delete")
    db.execute("DELETE FROM events WHERE position = 7")
    db.commit()
    db.close()
    dst = pg_dsn if to == "postgres" else str(tmp_path / "copy.db")
    with anyio.fail_after(60):
        with pytest.raises(XcoreError, match="event 7 is missing"):
            await copy_log(str(src), dst, batch=4, out=io.StringIO())
        if to == "postgres":
            copied = await read_pg(dst)
        else:
            store = SQLiteStore(Path(dst))
            await store.open()
            copied = await store.read()
            await store.close()
        assert [r.position for r in copied] == [1, 2, 3, 4, 5, 6]


async def test_an_event_postgresql_refuses_is_named_not_a_driver_traceback(
    tmp_path: Path, pg_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """SQLite keeps a NUL byte in a stream name, PostgreSQL's text cannot: the copy died
    with asyncpg's traceback. Now: one line naming the log, the batch and the event, exit
    2, and nothing of the refused batch written."""
    src = tmp_path / "nul.db"
    store = SQLiteStore(src)
    await store.open()
    try:
        await store.append([NewEvent.raw("Noted", {"i": 1})], stream="fine")
        await store.append([NewEvent.raw("Noted", {"i": 2})], stream="bad\x00name")
        await store.append([NewEvent.raw("Noted", {"i": 3})], stream="fine")
    finally:
        await store.close()
    args = ["store", "copy", str(src), pg_dsn]
    assert await anyio.to_thread.run_sync(main, args) == 2
    err = capsys.readouterr().err
    assert "writing events 1 to 3: PostgreSQL refused it" in err
    assert "the event PostgreSQL refuses is 2, stream 'bad\\x00name'" in err
    assert "Traceback" not in err
    assert await read_pg(pg_dsn) == []
