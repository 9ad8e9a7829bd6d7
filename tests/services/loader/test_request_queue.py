"""The loader's request queue, in process: what a restart leaves behind is said plainly.

(The queue itself — 202, following, merging, the CLI — is checked against a real
server in tests/e2e/test_reload_queue.py.)
"""

from __future__ import annotations

from pathlib import Path

import anyio

from kernel.events import Meta, NewEvent
from kernel.store.sqlite import SQLiteStore
from services.loader.events import PluginReloadRequested, stream_of

from .conftest import AUTH, status_router, write_plugin


async def test_a_request_left_by_a_stopped_server_reads_abandoned(
    harness_factory, plugins: Path, tmp_path: Path
) -> None:
    write_plugin(plugins, "a", router=status_router())
    h = await harness_factory()
    r = await h.client.post("/admin/plugins/a/reload", headers=AUTH)
    assert r.status_code == 200 and r.json()["status"] == "succeeded"
    done = r.json()["id"]
    await h.stop()
    # recorded while no server ran (as a crash between recording and handling leaves it),
    # and an upload whose install was never answered
    store = SQLiteStore(h.settings().database_path)
    await store.open()
    try:
        left = await store.append(
            [NewEvent.of(PluginReloadRequested(name="a"), Meta(actor="admin"))],
            stream=stream_of("a"),
        )
    finally:
        await store.close()
    upload = tmp_path / "var" / "uploads" / "x" / "a.zip"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(b"PK")
    await h.start()
    with anyio.fail_after(30):
        position = left[0].position
        body = (await h.client.get(f"/admin/loader/requests/{position}", headers=AUTH)).json()
        assert (body["status"], body["stage"]) == ("failed", "abandoned"), body
        assert "ask again" in body["error"]
        again = (await h.client.get(f"/admin/loader/requests/{done}", headers=AUTH)).json()
        assert (again["status"], again["outcome"]) == ("succeeded", "PluginReloaded")
        assert not upload.parent.exists()
        line = (await h.client.get("/admin/loader/requests", headers=AUTH)).json()
        assert (line["running"], line["queued"], line["total"]) == (None, [], 0), line
        assert line["next_cursor"] is None
        for bad in ("0", "-1", "abc", str(2**70)):
            r = await h.client.get(f"/admin/loader/requests/{bad}", headers=AUTH)
            assert r.status_code in (404, 422), (bad, r.text)
