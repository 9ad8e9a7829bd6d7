"""/health: 503 naming the store when the log cannot be written, 200 again after; no leaks."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import anyio
import pytest

from kernel.events import Event
from kernel.store.sqlite import SQLiteStore
from tests.services.monitor.conftest import AUTH, TOKEN, monitored

pytestmark = pytest.mark.anyio


class Probed(Event):
    n: int


async def test_health_turns_503_when_the_log_is_not_writable_and_recovers(tmp_path: Path) -> None:
    async with monitored(tmp_path) as m:
        assert isinstance(m.kernel.store, SQLiteStore)
        r = await m.client.get("/health")
        assert r.status_code == 200, r.text
        assert r.json()["failing"] == []
        # another process takes the log's write lock: appends fail (busy), really
        blocker = sqlite3.connect(m.kernel.settings.database_path, timeout=0.1)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(Exception, match="locked"):
                with anyio.fail_after(60):
                    await m.kernel.append(Probed(n=1), stream="probe")
            r = await m.client.get("/health")
            assert r.status_code == 503, r.text
            assert "store" in r.json()["failing"]
            detailed = await m.client.get("/health", headers=AUTH)
            store = detailed.json()["components"]["store"]
            assert store["ok"] is False and "locked" in store["error"]
            ready = await m.client.get("/health/ready")
            assert ready.status_code == 503 and ready.json()["failing"] == ["store"]
        finally:
            blocker.rollback()
            blocker.close()
        with anyio.fail_after(60):
            await m.kernel.append(Probed(n=2), stream="probe")
        r = await m.client.get("/health")
        assert r.status_code == 200, r.text
        assert (await m.client.get("/health/ready")).status_code == 200
        assert (await m.client.get("/health/live")).status_code == 200


async def test_health_shows_details_only_with_a_token(tmp_path: Path) -> None:
    async with monitored(tmp_path) as m:
        anonymous = await m.client.get("/health")
        text = anonymous.text
        body = anonymous.json()
        assert set(body) == {"status", "failing", "degraded", "components"}
        assert all(set(c) == {"ok"} for c in body["components"].values())
        for leak in (str(tmp_path), "monitor-test", "events.db", TOKEN):
            assert leak not in text
        assert {"store", "plugins", "subscribers", "logs"} <= set(body["components"])
        wrong = await m.client.get("/health", headers={"Authorization": "Bearer wrong"})
        assert set(wrong.json()) == {"status", "failing", "degraded", "components"}
        full = (await m.client.get("/health", headers=AUTH)).json()
        assert full["node"] == "monitor-test"
        assert full["components"]["store"]["last_position"] > 0
        assert "append_p99_ms" in full["components"]["store"]
        assert "lag" in full["components"]["subscribers"]
