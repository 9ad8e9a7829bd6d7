"""The writer's connection runs without the append-only triggers; every other one keeps
them, even while the writer is running (kernel/store/sqlite_trusted.py)."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import anyio
import pytest

from kernel.events import NewEvent
from kernel.store import SQLiteStore
from kernel.store.sqlite_trusted import skip_triggers, triggers_enabled

#: where the switch is reachable (3.12+: Connection.setconfig; 3.11 on Linux: ctypes)
REACHABLE = sys.implementation.name == "cpython" and (
    sys.version_info >= (3, 12) or sys.platform == "linux"
)


def ev(i: int) -> NewEvent:
    return NewEvent.raw("Counted", {"i": i})


@pytest.mark.skipif(not REACHABLE, reason="no trigger switch on this interpreter")
async def test_only_the_writers_connection_skips_the_triggers(tmp_path: Path) -> None:
    path = tmp_path / "odd name ?#%.db"
    # every event indexed at once: the forged insert below reuses an id of the id index
    # (one only in the unindexed end is reported by `xcore replay verify` instead)
    store = SQLiteStore(path, index_every=1)
    with anyio.fail_after(30):
        await store.open()
        try:
            assert store.writer_checked_by_triggers is False
            conn = store._write_conn
            assert conn is not None
            enabled = await conn._execute(triggers_enabled, conn._conn, str(path))  # type: ignore[attr-defined]
            assert enabled is False
            [first] = await store.append([ev(1)], stream="s")
            # a foreign connection, while the writer runs, is still checked by them
            foreign = sqlite3.connect(path)
            try:
                assert triggers_enabled(foreign, str(path)) is True
                for sql, params in [
                    ("INSERT OR REPLACE INTO events SELECT * FROM events", ()),
                    (
                        "INSERT OR REPLACE INTO events VALUES"
                        " (9, 'z', 1, 'Forged', 1, '{}', '{}', ?, 0)",
                        (first.meta.id,),
                    ),
                    ("DELETE FROM events", ()),
                    ("UPDATE events SET type = 'Forged'", ()),
                ]:
                    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                        foreign.execute(sql, params)
                foreign.rollback()
            finally:
                foreign.close()
            await store.append([ev(2)], stream="s")
            assert [r.type for r in await store.read()] == ["Counted", "Counted"]
        finally:
            await store.close()


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="the ctypes path is 3.11's")
def test_a_handle_that_names_another_file_is_left_alone(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "a.db")
    try:
        assert skip_triggers(conn, str(tmp_path / "b.db")) is False
        assert triggers_enabled(conn, str(tmp_path / "b.db")) is None
        assert triggers_enabled(conn, str(tmp_path / "a.db")) is not False
    finally:
        conn.close()
