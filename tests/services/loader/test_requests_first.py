"""Requests first: build threads wait while plugin requests are handled, not while a
response streams (kernel/pacing.py, services/router/dispatcher.py).

A request counts in ``pacing.serving`` until its response starts; a streamed body
(server-sent events, open for hours) mostly waits, and holding build threads for it
made every unit of every build wait ``build_yield_ms`` for an idle event loop (one
idle event stream took a 300-route reload from ~1 s to ~8 s).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio

from kernel import pacing

from .conftest import write_plugin

STREAM = """
    import asyncio
    from pathlib import Path
    from fastapi import APIRouter
    from fastapi.responses import StreamingResponse
    router = APIRouter()

    @router.get("/events")
    async def events(flag: str):
        Path(flag + ".in").write_text("")
        while not Path(flag + ".answer").exists():  # the handler is at work
            await asyncio.sleep(0.01)

        async def body():
            yield b"data: 1\\n\\n"
            while not Path(flag).exists():  # the stream is open, idle
                await asyncio.sleep(0.01)
            yield b"data: 2\\n\\n"

        return StreamingResponse(body(), media_type="text/event-stream")
    """


async def test_a_streaming_response_holds_no_build_once_it_started(
    harness_factory: Any, plugins: Path, tmp_path: Path
) -> None:
    write_plugin(plugins, "web", router=STREAM)
    h = await harness_factory()
    router: Any = h.kernel.services["router"]
    app = h.client._transport.app  # type: ignore[attr-defined]  # the kernel's ASGI app
    flag = tmp_path / "flag"
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/app/web/events",
        "raw_path": b"/app/web/events",
        "query_string": f"flag={flag}".encode(),
        "root_path": "",
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 40000),
        "server": ("test", 80),
    }
    sent: list[dict[str, Any]] = []
    received: list[bool] = []
    ended = anyio.Event()

    async def receive() -> dict[str, Any]:
        if not received:
            received.append(True)
            return {"type": "http.request", "body": b"", "more_body": False}
        await ended.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    base = pacing.serving
    with anyio.fail_after(60):
        mount = router.dispatcher.table.by_plugin["web"]
        async with anyio.create_task_group() as tg:

            async def request() -> None:
                await app(scope, receive, send)
                ended.set()

            tg.start_soon(request)
            while not (tmp_path / "flag.in").exists():
                await anyio.sleep(0.01)
            assert pacing.serving == base + 1  # handled: build threads wait for it
            (tmp_path / "flag.answer").write_text("")
            while not any(m.get("body", b"").startswith(b"data: 1") for m in sent):
                await anyio.sleep(0.01)
            assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
            assert pacing.serving == base  # streaming: it holds no build thread
            assert mount.in_flight.count == 1  # still in flight on its generation
            flag.write_text("go")
        assert b"data: 2" in b"".join(m.get("body", b"") for m in sent)
        assert pacing.serving == base and mount.in_flight.count == 0


async def test_the_loader_watches_its_event_loop_when_told_to(
    harness_factory: Any,
) -> None:
    """The loop first (kernel/pacing.py ``watch_loop``): with ``build_watch_loop`` or
    ``build_fine_yield`` (the default) a running loader has its event loop watched
    (paced builds give way while it is awake), shown in ``/health``; with neither, only
    the plugin requests are counted."""
    from .conftest import AUTH

    with anyio.fail_after(60):
        for loader in ({"build_watch_loop": True, "build_fine_yield": False}, {}):
            h = await harness_factory(loader=loader)
            health = (await h.client.get("/health", headers=AUTH)).json()
            assert health["components"]["loader"]["pacing"]["watching_loop"] is True, loader
            await h.stop()
            assert pacing.stats()["watching_loop"] is False  # unwatched at the stop
        off = await harness_factory(loader={"build_fine_yield": False})
        health = (await off.client.get("/health", headers=AUTH)).json()
        assert health["components"]["loader"]["pacing"]["watching_loop"] is False
