"""The loader's line, in process: bounded (429, nothing recorded), paged, fed by the log.

The plugin ``slow`` holds its import while a file the test holds exists, so every
request behind its reload waits in line as long as the test wants (no timing assumed).
(The same promises against a real ``xcore serve`` and the CLI: tests/e2e/test_reload_queue.py.)
"""

from __future__ import annotations

import asyncio
import io
import logging
import zipfile
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from kernel.errors import XcoreError
from services.loader.events import PluginReloadRequested, stream_of

from .conftest import AUTH, Harness, status_router, write_plugin

HELD = """
import pathlib, time
while pathlib.Path({hold!r}).exists():
    time.sleep(0.01)
"""


async def held_loader(harness_factory: Any, plugins: Path, hold: Path, **loader: Any) -> Harness:
    """A harness whose loader is busy with the reload of ``slow`` until ``hold`` goes."""
    write_plugin(plugins, "slow", run=HELD.format(hold=str(hold)), router=status_router())
    h: Harness = await harness_factory(loader={"import_timeout": 600, **loader})
    await anyio.Path(hold).touch()
    r = await h.client.post("/admin/plugins/slow/reload?wait=0", headers=AUTH)
    assert r.status_code == 202, r.text
    url = r.json()["url"]
    while (await h.client.get(url, headers=AUTH)).json()["status"] != "running":
        await anyio.sleep(0.01)
    return h


async def last_position(h: Harness) -> int:
    return await h.kernel.store.last_position()


async def until_done(h: Harness, url: str) -> dict[str, Any]:
    while True:
        body: dict[str, Any] = (await h.client.get(url, headers=AUTH)).json()
        if body["status"] in ("succeeded", "failed"):
            return body
        await anyio.sleep(0.02)


def archive(name: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(f"{name}/__init__.py", "")
        z.writestr(
            f"{name}/run.py", f"PLUGIN_INFO = {{'version': '1.0.0', 'api_prefix': '/app/{name}'}}\n"
        )
    return buf.getvalue()


async def test_a_full_line_refuses_at_once_and_changes_nothing(
    harness_factory, plugins: Path, tmp_path: Path, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="xcore.loader")
    for name in ("a", "b", "c"):
        write_plugin(plugins, name, router=status_router())
    hold = tmp_path / "hold"
    h = await held_loader(harness_factory, plugins, hold, max_queued=2)
    try:
        with anyio.fail_after(60):
            c = h.client
            first = (await c.post("/admin/plugins/a/reload?wait=0", headers=AUTH)).json()
            second = (await c.post("/admin/plugins/b/reload?wait=0", headers=AUTH)).json()
            assert (first["queue_position"], second["queue_position"]) == (1, 2)
            # full, but a reload already queued is joined, not counted again
            r = await c.post("/admin/plugins/a/reload?wait=0", headers=AUTH)
            assert r.status_code == 202 and r.json()["id"] == first["id"], r.text
            assert r.json()["merged"] is True

            before = await last_position(h)
            r = await c.post("/admin/plugins/c/reload?wait=0", headers=AUTH)
            assert r.status_code == 429, r.text
            assert int(r.headers["retry-after"]) >= 1
            detail = r.json()["detail"]
            assert "reload of plugin 'c'" in detail and "max_queued = 2" in detail, detail
            assert "2 requests are waiting" in detail and "nothing was recorded" in detail
            # every kind of request is bounded, all or nothing
            r = await c.delete("/admin/plugins/c?wait=0", headers=AUTH)
            assert r.status_code == 429 and "uninstall of plugin 'c'" in r.text, r.text
            r = await c.post("/admin/plugins/c/disable?wait=0", headers=AUTH)
            assert r.status_code == 429 and "disable of plugin 'c'" in r.text, r.text
            r = await c.post("/admin/plugins/reload?wait=0", headers=AUTH)
            # slow (running, not queued) and c are new; a and b would join: 2 new, no room
            assert r.status_code == 429 and "2 requests" in r.text, r.text
            files = {"file": ("new.zip", archive("newer"), "application/zip")}
            r = await c.post("/admin/plugins?wait=0", headers=AUTH, files=files)
            assert r.status_code == 429 and "install of archive 'new.zip'" in r.text, r.text
            assert not any((tmp_path / "var" / "uploads").glob("*/*"))  # upload dropped
            assert await last_position(h) == before  # nothing recorded
            line = (await c.get("/admin/loader/requests", headers=AUTH)).json()
            assert [q["id"] for q in line["queued"]] == [first["id"], second["id"]]

            health = (await c.get("/health", headers=AUTH)).json()["components"]["loader"]
            seen = health["requests"]
            assert (seen["queued"], seen["max_queued"], seen["refused"]) == (2, 2, 5), seen
            assert "install of archive 'new.zip'" in seen["last_refused"]["what"]
            logged = [r.getMessage() for r in caplog.records if "queue is full" in r.getMessage()]
            assert logged and "reload of plugin 'c'" in logged[0], logged
            assert "max_queued = 2" in logged[0]

            hold.unlink()
            assert (await until_done(h, first["url"]))["status"] == "succeeded"
            assert (await until_done(h, second["url"]))["status"] == "succeeded"
            r = await c.post("/admin/plugins/c/reload", headers=AUTH)  # room again
            assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
    finally:
        hold.unlink(missing_ok=True)


async def test_a_flood_of_requests_fills_the_line_exactly(
    harness_factory, plugins: Path, tmp_path: Path
) -> None:
    write_plugin(plugins, "a", router=status_router())
    write_plugin(plugins, "b", router=status_router())
    hold = tmp_path / "hold"
    h = await held_loader(harness_factory, plugins, hold, max_queued=20)
    try:
        with anyio.fail_after(120):
            c = h.client

            async def ask(method: str, url: str) -> httpx.Response:
                return await c.request(method, url, headers=AUTH)

            # 100 reloads of one plugin at once: one request
            merged = await asyncio.gather(
                *(ask("POST", "/admin/plugins/b/reload?wait=0") for _ in range(100))
            )
            assert {r.status_code for r in merged} == {202}
            assert len({r.json()["id"] for r in merged}) == 1
            # 300 uninstalls at once (never merged): 19 fit, the others are refused
            answers = await asyncio.gather(
                *(ask("DELETE", "/admin/plugins/a?wait=0") for _ in range(300))
            )
            codes = [r.status_code for r in answers]
            assert codes.count(202) == 19 and codes.count(429) == 281, sorted(set(codes))
            places = sorted(r.json()["queue_position"] for r in answers if r.status_code == 202)
            assert places == list(range(2, 21))
            asked = await h.events("PluginUninstallRequested")
            assert len(asked) == 19
            health = (await c.get("/health", headers=AUTH)).json()["components"]["loader"]
            assert health["requests"]["refused"] == 281
            hold.unlink()
            last = max((r for r in answers if r.status_code == 202), key=lambda r: r.json()["id"])
            done = await until_done(h, last.json()["url"])
            # the first uninstall removed `a`; the 18 others find nothing to remove
            assert done["status"] == "failed" and "not installed" in done["error"], done
            line = (await c.get("/admin/loader/requests", headers=AUTH)).json()
            assert (line["total"], line["queued"]) == (0, [])
    finally:
        hold.unlink(missing_ok=True)


async def test_the_line_is_paged_follows_the_log_and_refuses_odd_pages(
    harness_factory, plugins: Path, tmp_path: Path
) -> None:
    names = [f"p{i}" for i in range(7)]
    for name in names:
        write_plugin(plugins, name, router=status_router())
    hold = tmp_path / "hold"
    h = await held_loader(harness_factory, plugins, hold, max_queued=7)
    try:
        with anyio.fail_after(60):
            c = h.client
            for i, name in enumerate(names):
                if i % 2:
                    # recorded straight into the log, as the watcher or another tool does
                    await h.kernel.append(
                        PluginReloadRequested(name=name, reason="changed: run.py"),
                        stream=stream_of(name),
                        actor="watcher",
                    )
                else:
                    r = await c.post(f"/admin/plugins/{name}/reload?wait=0", headers=AUTH)
                    assert r.status_code == 202 and r.json()["queue_position"] == i + 1, r.text
            # the line counts those too: it is full
            r = await c.post("/admin/plugins/slow/reload?wait=0", headers=AUTH)
            assert r.status_code == 429, r.text

            seen: list[dict[str, Any]] = []
            cursor = None
            pages = 0
            while True:
                query = "?limit=3" + (f"&cursor={cursor}" if cursor else "")
                page = (await c.get(f"/admin/loader/requests{query}", headers=AUTH)).json()
                pages += 1
                assert page["total"] == 7 and page["running"]["name"] == "slow"
                assert len(page["queued"]) <= 3
                seen += page["queued"]
                cursor = page["next_cursor"]
                if cursor is None:
                    break
            assert pages == 3
            assert [q["name"] for q in seen] == names
            assert [q["queue_position"] for q in seen] == list(range(1, 8))
            for q in seen:  # one request's status says the same place
                one = (await c.get(q["url"], headers=AUTH)).json()
                assert one["queue_position"] == q["queue_position"], one
            everything = (await c.get("/admin/loader/requests?limit=1000", headers=AUTH)).json()
            assert everything["queued"] == seen and everything["next_cursor"] is None
            past = f"/admin/loader/requests?cursor={seen[-1]['id']}"
            assert (await c.get(past, headers=AUTH)).json()["queued"] == []

            for bad in ("-1", "0", "1001", str(10**9), "abc", "1.5", ""):
                r = await c.get(f"/admin/loader/requests?limit={bad}", headers=AUTH)
                assert r.status_code == 422 and "limit" in r.text, (bad, r.text)
            for bad in ("garbage", "-1", "1e5", " 1", "", "9" * 20, "1;DROP", "%00", "1%0A"):
                r = await c.get(f"/admin/loader/requests?cursor={bad}", headers=AUTH)
                assert r.status_code == 422 and "cursor" in r.text, (bad, r.text)
            r = await c.get(f"/admin/loader/requests?cursor={'9' * 19}", headers=AUTH)
            assert (r.status_code, r.json()["queued"]) == (200, []), r.text  # past the end
            r = await c.get("/admin/loader/requests?cursor=0&limit=2", headers=AUTH)
            assert [q["name"] for q in r.json()["queued"]] == names[:2]

            hold.unlink()
            await until_done(h, seen[-1]["url"])
            line = (await c.get("/admin/loader/requests?limit=1", headers=AUTH)).json()
            assert (line["total"], line["queued"], line["next_cursor"]) == (0, [], None)
            # a cursor of requests long gone still pages (the requests after it)
            r = await c.get(f"/admin/loader/requests?cursor={seen[2]['id']}", headers=AUTH)
            assert r.status_code == 200 and r.json()["queued"] == []
    finally:
        hold.unlink(missing_ok=True)


async def test_max_queued_is_validated(harness_factory) -> None:
    for bad in (0, -5, "many", 10**7):
        with pytest.raises(XcoreError, match=r"services\.loader\.max_queued"):
            await harness_factory(loader={"max_queued": bad})


async def test_a_line_that_cannot_follow_the_log_answers_503_not_a_wrong_place(
    harness_factory, plugins: Path
) -> None:
    write_plugin(plugins, "a", router=status_router())
    h: Harness = await harness_factory()
    with anyio.fail_after(30):
        follower = h.loader.queue._follower
        assert follower is not None and follower._task is not None
        follower._task.cancel()  # as if its task had died
        await h.kernel.append(
            PluginReloadRequested(name="a"), stream=stream_of("a"), actor="watcher"
        )
        before = await last_position(h)
        r = await h.client.post("/admin/plugins/a/reload?wait=0", headers=AUTH)
        assert r.status_code == 503 and "loader's queue did not read the log" in r.text, r.text
        assert await last_position(h) == before
        r = await h.client.get("/admin/loader/requests", headers=AUTH)
        assert r.status_code == 503, r.text


async def test_a_request_recorded_before_the_line_falls_behind_is_not_answered_as_refused(
    harness_factory, plugins: Path, tmp_path: Path, monkeypatch
) -> None:
    """The line falls behind after the request was recorded (here: it gets no time at
    all): the request is in the log and will run, so the answer says so (its id, its
    URL) and an install keeps its upload for the loader — not a 503 that reads as
    "nothing happened" with the archive deleted under the recorded request."""
    from services.loader import queue as queue_module

    hold = tmp_path / "hold"
    h = await held_loader(harness_factory, plugins, hold)
    with anyio.fail_after(60):
        # the line is at the log's end; from now on it may not wait for anything
        monkeypatch.setattr(queue_module, "SYNC_TIMEOUT", 0.0)
        before = await last_position(h)
        files = {"file": ("late.zip", archive("late"), "application/zip")}
        r = await h.client.post("/admin/plugins?wait=0", files=files, headers=AUTH)
        assert await last_position(h) == before + 1  # recorded
        # accepted (its place read once the line caught up) or, still behind, 503 with
        # the request's URL: either way the id to follow, never "nothing was recorded"
        assert r.status_code in (202, 503), r.text
        body = r.json()
        assert body["id"] == before + 1 and r.headers["location"] == body["url"], body
        if r.status_code == 202:
            assert body["queue_position"] == 1, body
        else:
            assert "recorded" in body["detail"], body
        uploads = list((h.loader.data_dir / "uploads").glob("*/late.zip"))
        assert len(uploads) == 1  # kept: the loader reads it when the install runs
        monkeypatch.setattr(queue_module, "SYNC_TIMEOUT", 30.0)
        await anyio.Path(hold).unlink()
        done = await until_done(h, body["url"])
        assert done["status"] == "succeeded", done
        assert "late" in h.loader.loaded
