"""The kernel's own command line: version, events, and clear errors."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import orjson

from kernel.events import NewEvent
from kernel.store import SQLiteStore


def xcore(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kernel.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin"},
    )


def test_version(tmp_path: Path) -> None:
    proc = xcore("version", cwd=tmp_path)
    assert proc.returncode == 0
    assert proc.stdout.strip()


def test_events_prints_json_lines_filtered(tmp_path: Path) -> None:
    async def seed() -> None:
        store = SQLiteStore(tmp_path / "var" / "events.db")
        await store.open()
        await store.append([NewEvent.raw("A", {"i": 1}), NewEvent.raw("B", {"i": 2})], stream="s")
        await store.append([NewEvent.raw("A", {"i": 3})], stream="t")
        await store.close()

    asyncio.run(seed())
    proc = xcore("events", "--data-dir", "var", "--type", "A", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = [orjson.loads(line) for line in proc.stdout.splitlines()]
    assert [(e["type"], e["data"]["i"]) for e in lines] == [("A", 1), ("A", 3)]
    proc = xcore("events", "--data-dir", "var", "--after", "1", "--limit", "1", cwd=tmp_path)
    assert [orjson.loads(line)["position"] for line in proc.stdout.splitlines()] == [2]


def test_events_on_a_missing_log_is_a_clear_error(tmp_path: Path) -> None:
    proc = xcore("events", "--data-dir", "nowhere", cwd=tmp_path)
    assert proc.returncode == 2
    assert "no such event log" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_commands_reading_a_bad_log_say_so_in_one_line_and_exit_2(tmp_path: Path) -> None:
    import sqlite3

    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "events.db").write_text("name,age\nada,36\n" * 20)
    other = tmp_path / "other"
    other.mkdir()
    conn = sqlite3.connect(other / "events.db")
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
    conn.commit()
    conn.close()
    before = sorted(p.name for p in other.iterdir())
    for folder in ("text", "other"):
        for args in (("events",), ("backup", "copy.db")):
            proc = xcore(*args, "--data-dir", folder, cwd=tmp_path)
            assert proc.returncode == 2, (args, folder, proc.stdout, proc.stderr)
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and "not an xcore event log" in lines[0], (args, lines)
    # read-only looks left no -wal/-shm next to the foreign log
    assert sorted(p.name for p in other.iterdir()) == before
    assert not (tmp_path / "copy.db").exists()


def test_backup_and_restore_from_the_command_line(tmp_path: Path) -> None:
    async def seed() -> None:
        store = SQLiteStore(tmp_path / "var" / "events.db")
        await store.open()
        await store.append([NewEvent.raw("A", {"i": i}) for i in range(10)], stream="s")
        await store.close()

    asyncio.run(seed())
    proc = xcore("backup", "--data-dir", "var", "copy.db", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "backed up 10 events" in proc.stdout
    proc = xcore("restore", "--data-dir", "var2", "copy.db", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = xcore("events", "--data-dir", "var2", cwd=tmp_path)
    assert len(proc.stdout.splitlines()) == 10
    proc = xcore("restore", "--data-dir", "var2", "copy.db", cwd=tmp_path)
    assert proc.returncode == 2 and "--force" in proc.stderr


def test_no_command_prints_help(tmp_path: Path) -> None:
    proc = xcore(cwd=tmp_path)
    assert proc.returncode == 2
    assert "serve" in proc.stdout


def test_the_admin_client_says_clearly_when_no_server_answers() -> None:
    import pytest

    from kernel.client import ServerUnreachable, admin_call
    from tests.e2e.server import free_port

    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServerUnreachable, match=f"no xcore server answers at {url}"):
        admin_call(url, "token", "GET", "/plugins", timeout=5)


def test_serve_on_a_damaged_log_exits_instead_of_hanging(tmp_path: Path) -> None:
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "events.db").write_bytes(b"SQLite format 3\x00" + b"\x07" * 8000)
    proc = xcore("serve", "--data-dir", "var", "--port", "0", "--no-reload", cwd=tmp_path)
    assert proc.returncode != 0
    assert "events.db" in proc.stderr + proc.stdout
    # the lock was released: a read-only look gives the same clear error, exit 2
    again = xcore("events", "--data-dir", "var", cwd=tmp_path)
    assert again.returncode == 2 and "Traceback" not in again.stderr
