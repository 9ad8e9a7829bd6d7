"""A sandboxed plugin over a real kernel: routes, tasks, hooks, events, admin views."""

from __future__ import annotations

import os
from typing import Any

import anyio

from tests.services.sandbox.conftest import AUTH, sandboxed, write_plugin

ROUTER = """
    import os
    from fastapi import APIRouter, Request, Response
    from fastapi.responses import StreamingResponse
    router = APIRouter()

    @router.get("/status")
    async def status():
        return {"pid": os.getpid(), "uid": os.getuid()}

    @router.post("/echo")
    async def echo(request: Request):
        body = await request.body()
        return Response(body, status_code=201, headers={"x-len": str(len(body))}, media_type="application/octet-stream")

    @router.get("/boom")
    def boom():
        raise ValueError("boom")
"""


async def test_a_sandboxed_plugin_serves_its_routes_from_another_process(harness: Any, level: str) -> None:
    h = await harness(level)
    write_plugin(h.plugins, "box", info=sandboxed("box"), router=ROUTER)
    r = await h.reload("box")
    assert r.status_code == 200, r.text
    with anyio.fail_after(30):
        status = await h.client.get("/app/box/status")
    assert status.status_code == 200, status.text
    assert status.json()["pid"] != os.getpid()
    echo = await h.client.post("/app/box/echo", content=b"x" * 1_000_000)
    assert echo.status_code == 201
    assert echo.content == b"x" * 1_000_000
    boom = await h.client.get("/app/box/boom")
    assert boom.status_code == 500
    started = await h.events("SandboxStarted", plugin="box")
    assert started and started[-1].data["level"] == level
    row = (await h.client.get("/admin/plugins/box", headers=AUTH)).json()
    assert row["mode"] == "sandboxed"
    assert row["host"]["level"] == level
    assert row["host"]["state"] == "running"
