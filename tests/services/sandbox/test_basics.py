"""A sandboxed plugin over a real kernel: routes, tasks, hooks, events, admin views."""

from __future__ import annotations

import os
from pathlib import Path
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


async def test_a_sandboxed_plugin_serves_its_routes_from_another_process(
    harness: Any, level: str
) -> None:
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
    host = row["host"]
    assert host["level"] == level
    assert host["state"] == "running"
    assert host["pid"] > 0 and host["rss_mb"] > 0 and host["start_ms"] > 0
    assert host["stats"]["calls"] >= 3 and host["stats"]["failures"] >= 1
    assert host["stats"]["by_kind"]["http"] >= 3
    assert host["stats"]["cpu_ms_total"] > 0
    assert host["limits"]["memory"] == 1024 * 2**20
    overview = (await h.client.get("/admin/sandbox", headers=AUTH)).json()
    assert overview["level"] == level and overview["plugins"][0]["plugin"] == "box"
    health = (await h.client.get("/health")).json()["checks"]["sandbox"]
    assert health["workers"] == 1 and health["level"] == level


HTTP_ROUTER = """
    from fastapi import APIRouter, Request, Response
    from fastapi.responses import StreamingResponse
    router = APIRouter()

    @router.api_route("/echo", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def echo(request: Request):
        body = await request.body()
        headers = [[k, v] for k, v in request.headers.items() if k.startswith("x-")]
        response = Response(body, status_code=207, media_type="application/octet-stream")
        response.headers["x-method"] = request.method
        response.headers["x-query"] = request.url.query
        response.headers["x-seen"] = repr(headers)
        response.headers.append("x-multi", "a")
        response.headers.append("x-multi", "b")
        return response

    @router.get("/stream")
    async def stream():
        async def parts():
            for i in range(50):
                yield (str(i) * 10000).encode()
        return StreamingResponse(parts(), media_type="text/plain")
"""


async def test_http_round_trips_faithfully_and_big_bodies_get_413(harness: Any) -> None:
    h = await harness("rlimits", sandbox={"max_body_mb": 2})
    write_plugin(h.plugins, "web", info=sandboxed("web"), router=HTTP_ROUTER)
    assert (await h.reload("web")).status_code == 200
    body = bytes(range(256)) * 4000  # ~1 MB, every byte value
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        r = await h.client.request(
            method,
            "/app/web/echo?a=1&a=2&b=%20x",
            content=body,
            headers=[("x-one", "1"), ("x-rep", "p"), ("x-rep", "q")],
        )
        assert r.status_code == 207
        assert r.content == body
        assert r.headers["x-method"] == method
        assert r.headers["x-query"] == "a=1&a=2&b=%20x"
        assert r.headers.get_list("x-multi") == ["a", "b"]
        assert "'x-rep', 'p, q'" in r.headers["x-seen"] or "'x-rep', 'p'" in r.headers["x-seen"]
    stream = await h.client.get("/app/web/stream")
    assert stream.content == b"".join((str(i) * 10000).encode() for i in range(50))
    big = await h.client.post("/app/web/echo", content=b"x" * (3 * 1024 * 1024))
    assert big.status_code == 413
    assert "web" in big.json()["detail"]

    async def chunks():
        for _ in range(30):
            yield b"y" * 100_000

    streamed = await h.client.post("/app/web/echo", content=chunks())
    assert streamed.status_code == 413
    missing = await h.client.get("/app/web/nope")
    assert missing.status_code == 404
    paths = (await h.client.get("/openapi.json")).json()["paths"]
    assert "/app/web/echo" in paths and "/app/web/stream" in paths


async def test_websocket_routes_are_refused_at_load_with_a_clear_message(harness: Any) -> None:
    h = await harness("rlimits")
    write_plugin(
        h.plugins,
        "ws",
        info=sandboxed("ws"),
        router="""
            from fastapi import APIRouter, WebSocket
            router = APIRouter()

            @router.websocket("/live")
            async def live(ws: WebSocket):
                await ws.accept()
        """,
    )
    r = await h.reload("ws")
    assert r.status_code == 422
    assert "websocket" in r.json()["detail"] and "/live" in r.json()["detail"]


async def test_limits_above_the_ceiling_are_refused_naming_the_key(harness: Any) -> None:
    h = await harness("rlimits", sandbox={"max_memory_mb": 512, "memory_mb": 256})
    write_plugin(
        h.plugins, "greedy", info=sandboxed("greedy", limits={"memory": "1g"}), router=ROUTER
    )
    r = await h.reload("greedy")
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert "limits.memory" in detail and "max_memory_mb" in detail
    assert not await h.events("SandboxStarted", plugin="greedy")


async def test_the_environment_is_an_allowlist(harness: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("XCORE_SECRET_FOR_TEST", "very-secret-value")
    h = await harness("rlimits")
    write_plugin(
        h.plugins,
        "env",
        info=sandboxed("env"),
        router="""
            import os
            from fastapi import APIRouter
            router = APIRouter()

            @router.get("/env")
            async def env():
                return dict(os.environ)
        """,
    )
    assert (await h.reload("env")).status_code == 200
    env = (await h.client.get("/app/env/env")).json()
    assert "XCORE_SECRET_FOR_TEST" not in env
    assert "very-secret-value" not in repr(env)
    assert set(env) <= {
        "PATH",
        "LANG",
        "LC_ALL",
        "LC_CTYPE",
        "TZ",
        "HOME",
        "TMPDIR",
        "MALLOC_ARENA_MAX",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
    }


FS_ROUTER = """
    import os
    from pathlib import Path
    from fastapi import APIRouter
    router = APIRouter()

    def attempt(fn):
        try:
            fn()
            return "ok"
        except OSError as exc:
            return f"refused: {type(exc).__name__}"

    @router.get("/fs")
    def fs(kernel_data: str):
        here = Path(__file__).parent
        data = Path(os.environ["HOME"])
        return {
            "own_folder": attempt(lambda: (here / "planted.py").write_text("x")),
            "data_dir": attempt(lambda: (data / "kept.txt").write_text("x")),
            "tmp": attempt(lambda: Path("/tmp/xcore-sandbox-private-probe").write_text("x")),
            "kernel_data": attempt(lambda: os.listdir(kernel_data) and open(Path(kernel_data) / "events.db", "rb").read(1)),
        }
"""


async def test_bwrap_level_file_system(harness: Any, level: str) -> None:
    if level != "bwrap":
        return  # the rlimits level does not isolate the file system (see docs/sandbox.md)
    h = await harness(level)
    write_plugin(h.plugins, "fs", info=sandboxed("fs"), router=FS_ROUTER)
    assert (await h.reload("fs")).status_code == 200
    seen = (await h.client.get("/app/fs/fs", params={"kernel_data": str(h.base / "var")})).json()
    assert seen["own_folder"].startswith("refused")
    assert seen["data_dir"] == "ok"
    assert seen["tmp"] == "ok"
    assert seen["kernel_data"].startswith("refused")
    assert not (h.plugins / "fs" / "planted.py").exists()
    assert (h.base / "var" / "plugins" / "fs" / "kept.txt").exists()
    assert not Path("/tmp/xcore-sandbox-private-probe").exists()  # noqa: ASYNC240 - its /tmp is private


LIMITS_ROUTER = """
    import os, resource
    from fastapi import APIRouter
    router = APIRouter()

    @router.get("/limits")
    def limits():
        names = ["RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_FSIZE", "RLIMIT_CORE"]
        out = {n: list(resource.getrlimit(getattr(resource, n))) for n in names}
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (100_000, 100_000))
            out["raised"] = True
        except (ValueError, OSError):
            out["raised"] = False
        opened = []
        try:
            while True:
                opened.append(open(os.devnull))
        except OSError:
            pass
        out["opened"] = len(opened)
        return out
"""


async def test_the_worker_sets_its_limits_and_cannot_lift_them(harness: Any, level: str) -> None:
    h = await harness(level, sandbox={"memory_mb": 900, "open_files": 200})
    info = sandboxed("lim", limits={"open_files": 50, "cpu": "120s", "file_size": "5m"})
    write_plugin(h.plugins, "lim", info=info, router=LIMITS_ROUTER)
    assert (await h.reload("lim")).status_code == 200
    seen = (await h.client.get("/app/lim/limits")).json()
    assert seen["RLIMIT_AS"] == [900 * 2**20] * 2  # the operator's default
    assert seen["RLIMIT_NOFILE"] == [50, 50]  # lowered by the manifest
    assert seen["RLIMIT_CPU"] == [120, 121]
    assert seen["RLIMIT_FSIZE"] == [5 * 2**20] * 2
    assert seen["RLIMIT_CORE"] == [0, 0]
    assert seen["RLIMIT_NPROC"][0] == seen["RLIMIT_NPROC"][1]
    assert seen["raised"] is False
    assert seen["opened"] < 50
    started = await h.events("SandboxStarted", plugin="lim")
    assert started[-1].data["limits"]["open_files"] == 50


NET_ROUTER = """
    import socket
    from fastapi import APIRouter
    router = APIRouter()

    @router.get("/connect")
    def connect(port: int):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=3):
                return "connected"
        except OSError as exc:
            return f"refused: {exc}"
"""


async def test_network_needs_the_manifest_and_the_operator(harness: Any, level: str) -> None:
    if level != "bwrap":
        return  # the rlimits level has no network namespace
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        h = await harness(level, sandbox={"allow_network": True})
        write_plugin(h.plugins, "asks", info=sandboxed("asks", network=True), router=NET_ROUTER)
        write_plugin(h.plugins, "quiet", info=sandboxed("quiet"), router=NET_ROUTER)
        assert (await h.reload("asks")).status_code == 200
        assert (await h.reload("quiet")).status_code == 200
        asks = (await h.client.get("/app/asks/connect", params={"port": port})).json()
        quiet = (await h.client.get("/app/quiet/connect", params={"port": port})).json()
    assert asks == "connected"
    assert quiet.startswith("refused")
    started = {e.data["plugin"]: e.data["network"] for e in await h.events("SandboxStarted")}
    assert started == {"asks": True, "quiet": False}
