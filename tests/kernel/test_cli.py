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
    assert proc.returncode == 1
    assert "no such event log" in proc.stderr
    assert "Traceback" not in proc.stderr


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
