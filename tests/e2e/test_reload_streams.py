"""Requests that outlive a reload, end to end: a real ``xcore serve``.

An event stream and a websocket opened on generation 1 go on across a reload and end
normally on it, while new requests get generation 2. Meanwhile generation 1 is listed
as draining in ``/health`` (not as a leak, although the collector runs a full
collection after the reload), and once they end it is freed: never reported leaked.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import anyio
import httpx
import websockets

from .server import serve

TOKEN = "e2e-reload-streams-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def router_source(version: int, flag: Path) -> str:
    return textwrap.dedent(
        f"""
        import asyncio
        from pathlib import Path
        from fastapi import APIRouter, WebSocket
        from fastapi.responses import StreamingResponse

        router = APIRouter()
        FLAG = Path({str(flag)!r})

        @router.get("/v", name="version")
        async def version():
            return {{"v": {version}}}

        @router.get("/events")
        async def events():
            async def body():
                yield b"data: {version} start\\n\\n"
                while not FLAG.exists():
                    await asyncio.sleep(0.02)
                yield b"data: {version} end\\n\\n"
            return StreamingResponse(body(), media_type="text/event-stream")

        @router.websocket("/ws")
        async def ws(sock: WebSocket):
            await sock.accept()
            while True:
                text = await sock.receive_text()
                await sock.send_text(f"{version}:{{text}}:{{sock.url_for('version').path}}")
                if text == "bye":
                    await sock.close()
                    return
        """
    )


async def test_streams_and_websockets_outlive_a_reload_and_their_generation_is_freed(
    tmp_path: Path,
) -> None:
    plugins = tmp_path / "plugins"
    folder = plugins / "live"
    folder.mkdir(parents=True)
    flag = tmp_path / "flag"
    (folder / "__init__.py").write_text("")
    (folder / "run.py").write_text(
        "PLUGIN_INFO = {'version': '1.0.0', 'api_prefix': '/app/live'}\n"
    )
    (folder / "router.py").write_text(router_source(1, flag))
    with serve(tmp_path, plugins_dir=plugins, env={"XCORE_ADMIN_TOKEN": TOKEN}) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:

            async def loader_health() -> dict[str, object]:
                r = await client.get("/health", headers=AUTH)
                loader: dict[str, object] = r.json()["components"]["loader"]
                return loader

            with anyio.fail_after(120):
                url = server.url.replace("http://", "ws://") + "/app/live/ws"
                async with (
                    websockets.connect(url) as sock,
                    client.stream("GET", "/app/live/events") as stream,
                ):
                    lines = stream.aiter_lines()
                    assert await anext(lines) == "data: 1 start"
                    await sock.send("hi")
                    assert await sock.recv() == "1:hi:/app/live/v"
                    (folder / "router.py").write_text(router_source(2, flag))
                    r = await client.post("/admin/plugins/live/reload", headers=AUTH)
                    assert r.status_code == 200, r.text
                    assert (await client.get("/app/live/v")).json() == {"v": 2}
                    # no collection of the collector's is pending for the unload any more
                    # (it ran, or none was due: it could not free generation 1 now)
                    while (await loader_health())["gc"]["pending"]:  # type: ignore[index]
                        await anyio.sleep(0.05)
                    health = await loader_health()
                    assert health.get("draining_generations", {}).keys() == {"live"}, health  # type: ignore[union-attr]
                    assert "leaked_generations" not in health, health
                    await sock.send("bye")
                    assert await sock.recv() == "1:bye:/app/live/v"
                    flag.write_text("")
                    rest = [line async for line in lines if line]
                    assert rest == ["data: 1 end"]
                while "draining_generations" in (health := await loader_health()):
                    await anyio.sleep(0.05)
                assert "leaked_generations" not in health, json.dumps(health)
                assert (await client.get("/app/live/v")).json() == {"v": 2}
        assert "Traceback" not in server.output()
