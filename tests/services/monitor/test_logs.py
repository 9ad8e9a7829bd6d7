"""Centralized logs: plugin lines found by plugin, request id and stream; the store's bounds."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from fastapi import APIRouter

from kernel.client import iter_sse
from kernel.logging import add_sink, remove_sink
from services.monitor.logstore import LogQuery, LogStore
from services.monitor.settings import LogSettings
from tests.services.monitor.conftest import AUTH, monitored

pytestmark = pytest.mark.anyio


def _talking_router() -> APIRouter:
    router = APIRouter(prefix="/talk")
    log = logging.getLogger("xcore.plugin.talker")

    @router.get("/say/{word}")
    async def say(word: str) -> dict[str, str]:
        log.warning("the plugin says %s", word)
        return {"said": word}

    return router


async def _until(probe: Any, timeout: float = 20) -> Any:
    with anyio.fail_after(timeout):
        while True:
            value = await probe()
            if value:
                return value
            await anyio.sleep(0.02)


async def test_a_plugin_line_is_found_by_plugin_and_request_id_and_streamed(
    tmp_path: Path,
) -> None:
    async with monitored(tmp_path) as m:
        await m.load("talker", _talking_router(), "/app")
        # a client that follows the plugin's lines from now on
        received: list[dict[str, Any]] = []

        async def follow() -> None:
            async with m.client.stream(
                "GET", "/admin/logs/stream", params={"plugin": "talker"}, headers=AUTH
            ) as response:
                assert response.status_code == 200
                lines = (line.encode() + b"\n" async for line in response.aiter_lines())
                buffered: list[bytes] = []
                async for raw in lines:
                    buffered.append(raw)
                    if raw == b"\n":
                        for message in iter_sse(buffered):
                            received.append(message.data)
                        buffered = []
                        if received:
                            return

        async with anyio.create_task_group() as tg:
            tg.start_soon(follow)
            await anyio.sleep(0.3)  # the stream is open before the line is written
            r = await m.client.get("/app/talk/say/hello", headers={"X-Request-ID": "req-42"})
            assert r.status_code == 200
            assert r.headers["x-request-id"] == "req-42"
            with anyio.fail_after(20):
                while not received:
                    await anyio.sleep(0.02)
            tg.cancel_scope.cancel()
        assert received[0]["message"] == "the plugin says hello"
        assert received[0]["request_id"] == "req-42"

        async def by_plugin() -> list[dict[str, Any]]:
            body = (await m.client.get("/admin/logs?plugin=talker", headers=AUTH)).json()
            return body["lines"]

        [line] = await _until(by_plugin)
        assert line["plugin"] == "talker" and line["level"] == "WARNING"
        assert line["logger"] == "xcore.plugin.talker"
        by_request = await m.client.get(
            "/admin/logs", params={"request_id": "req-42"}, headers=AUTH
        )
        assert [x["id"] for x in by_request.json()["lines"]] == [line["id"]]

        # a request without an id gets a fresh one, echoed and carried by its lines
        r = await m.client.get("/app/talk/say/again")
        rid = r.headers["x-request-id"]
        assert len(rid) == 32

        async def by_new_request() -> list[dict[str, Any]]:
            body = await m.client.get("/admin/logs", params={"request_id": rid}, headers=AUTH)
            return body.json()["lines"]

        [again] = await _until(by_new_request)
        assert again["message"] == "the plugin says again"

        # an insane X-Request-ID is replaced, never echoed
        r = await m.client.get("/app/talk/say/x", headers={"X-Request-ID": "a b\tc" * 50})
        assert r.headers["x-request-id"] != "a b\tc" * 50


async def test_bad_log_queries_are_refused_naming_the_field(tmp_path: Path) -> None:
    async with monitored(tmp_path) as m:
        for query, field in (
            ("level=LOUD", "level"),
            ("limit=0", "limit"),
            ("limit=100000", "limit"),
            ("cursor=-3", "cursor"),
            ("since=yesterday", "since"),
            ("plugn=talker", "plugn"),
        ):
            r = await m.client.get(f"/admin/logs?{query}", headers=AUTH)
            assert r.status_code == 422, (query, r.text)
            assert any(field in err["loc"] for err in r.json()["detail"]), (query, r.text)
        r = await m.client.get("/admin/events/stream", headers={**AUTH, "Last-Event-ID": "abc"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["header", "Last-Event-ID"]


def _line(i: int, plugin: str = "flood") -> dict[str, Any]:
    return {
        "ts": time.time(),
        "level": "INFO",
        "levelno": 20,
        "logger": f"xcore.plugin.{plugin}",
        "plugin": plugin,
        "task": None,
        "run_id": None,
        "request_id": None,
        "message": f"line {i}",
        "extra": {},
        "exc": None,
    }


async def test_retention_holds_under_a_flood_and_drops_the_oldest_first(tmp_path: Path) -> None:
    store = LogStore(tmp_path / "logs.db", LogSettings(max_lines=100, buffer=100_000))
    store.bind(__import__("asyncio").get_running_loop())
    store.open()
    add_sink(store.sink)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(store.run)
            flood = logging.getLogger("xcore.plugin.flood")
            flood.setLevel(logging.INFO)
            try:
                for i in range(5000):
                    flood.info("line %d", i)
                with anyio.fail_after(30):
                    while "line 4999" not in [
                        x["message"] for x in (await store.query(LogQuery(), limit=5))[0]
                    ]:
                        await anyio.sleep(0.02)
            finally:
                flood.setLevel(logging.NOTSET)
            tg.cancel_scope.cancel()
        lines, more = await store.query(LogQuery(), limit=1000)
        assert store.count == 100 and len(lines) == 100 and not more
        # every line captured is either stored or counted as dropped
        assert store.dropped == store.last_id - 100 >= 4900
        # the newest survived: the oldest were dropped first
        flood = [x["message"] for x in lines if x["plugin"] == "flood"]
        assert flood == [f"line {i}" for i in range(4999, 4999 - len(flood), -1)]
        assert len(flood) >= 90  # (other loggers may have written a few lines meanwhile)
    finally:
        remove_sink(store.sink)
        store.close()
    # the count of dropped lines survives a reopen
    again = LogStore(tmp_path / "logs.db", LogSettings(max_lines=100))
    again.open()
    assert again.dropped == store.dropped and again.count == 100
    again.close()


async def test_age_limit_and_cursor_pages_are_stable_while_lines_arrive(tmp_path: Path) -> None:
    store = LogStore(tmp_path / "logs.db", LogSettings(max_lines=10_000, max_age=60))
    store.open()
    try:
        old = [_line(i) | {"ts": time.time() - 3600} for i in range(5)]
        store._write_batch(old)  # an hour old: dropped by the age bound
        store._last_age_prune = 0
        store._write_batch([_line(i) for i in range(250)])
        assert store.count == 250 and store.dropped == 5
        seen: list[int] = []
        cursor = None
        page = 0
        while True:
            lines, more = await store.query(LogQuery(), limit=100, before=cursor)
            seen += [x["id"] for x in lines]
            # new lines arrive between pages: they do not shift the pages
            store._write_batch([_line(1000 + page)])
            page += 1
            if not more:
                break
            cursor = lines[-1]["id"]
        assert len(seen) == 250 and len(set(seen)) == 250
        assert seen == sorted(seen, reverse=True)
    finally:
        store.close()


async def test_a_huge_line_is_cut_before_it_is_buffered(tmp_path: Path) -> None:
    store = LogStore(tmp_path / "logs.db", LogSettings(max_message=1000))
    store.open()
    try:
        line = _line(0) | {"message": "x" * 5_000_000, "exc": "y" * 5_000_000}
        store.sink(line)
        [buffered] = list(store._pending)
        assert len(buffered["message"]) < 1100 and len(buffered["exc"]) < 1100
        assert len(line["message"]) == 5_000_000  # the other sinks' copy is untouched
        store._write_batch(store._take())
        [stored], _ = await store.query(LogQuery())
        assert stored["message"].endswith("[4999000 more characters]")
    finally:
        store.close()


async def test_a_non_finite_time_filter_is_refused_not_an_empty_page(tmp_path: Path) -> None:
    async with monitored(tmp_path) as m:
        with anyio.fail_after(30):
            for name in ("since", "until"):
                for value in ("nan", "inf", "-inf"):
                    r = await m.client.get("/admin/logs", params={name: value}, headers=AUTH)
                    assert r.status_code == 422, (name, value, r.text)
                    assert r.json()["detail"][0]["loc"] == ["query", name]
            r = await m.client.get("/admin/logs", params={"since": 0}, headers=AUTH)
            assert r.status_code == 200
