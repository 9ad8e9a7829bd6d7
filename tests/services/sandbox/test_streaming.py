"""Flow control of streamed responses, end to end, over a real ``xcore serve``.

A sandboxed route streaming an endless body to a client that stops reading is paused:
the worker may be ahead of its client by one window (``protocol.WINDOW_*``) plus what the
sockets hold, the kernel's memory does not grow with the stream, and the stream goes on,
intact, when the client reads again. When the client leaves, the response ends. A
stream slow to start shows its headers at once.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.e2e.server import serve

ROUTER = """
    import asyncio

    from fastapi import APIRouter
    from fastapi.responses import StreamingResponse

    router = APIRouter()
    SENT = {"chunks": 0}
    CHUNK = b"x" * 65536

    @router.get("/endless")
    async def endless():
        async def body():
            while True:
                SENT["chunks"] += 1
                yield CHUNK

        return StreamingResponse(body(), media_type="application/octet-stream")

    @router.get("/sent")
    async def sent():
        return SENT

    GO = asyncio.Event()

    @router.get("/slow")
    async def slow():
        async def body():
            await GO.wait()
            yield b"done"

        return StreamingResponse(body(), media_type="text/plain")

    @router.post("/go")
    async def go():
        GO.set()
"""
MIB = 1024 * 1024


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _until(check: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_an_endless_stream_waits_for_its_client() -> None:
    base = Path(tempfile.mkdtemp(prefix="xcore-stream-"))
    base.chmod(0o755)
    plugin = base / "plugins" / "stream"
    plugin.mkdir(parents=True)
    (plugin / "__init__.py").write_text("")
    (plugin / "run.py").write_text(
        "PLUGIN_INFO = {'version': '1.0.0', 'api_prefix': '/app/stream', 'mode': 'sandboxed'}\n"
    )
    (plugin / "router.py").write_text(textwrap.dedent(ROUTER))
    env = {
        "XCORE_ADMIN_TOKEN": "stream-admin-token-0123456789",
        "XCORE_RELOAD": "false",
        "XCORE_SERVICES__SANDBOX__LEVEL": "rlimits",
        "XCORE_SERVICES__SANDBOX__WALL_TIME_S": "600",
    }
    try:
        with serve(base, plugins_dir=base / "plugins", env=env, timeout=60) as srv:
            sent_url = f"{srv.url}/app/stream/sent"
            auth = {"Authorization": f"Bearer {env['XCORE_ADMIN_TOKEN']}"}

            def sent() -> dict[str, int]:
                r = httpx.get(sent_url, timeout=30)
                assert r.status_code == 200, r.text
                return dict(r.json())

            host, port = srv.url.removeprefix("http://").split(":")

            # a stream slow to start shows its headers before its first piece
            with socket.create_connection((host, int(port)), timeout=60) as slow:
                slow.sendall(b"GET /app/stream/slow HTTP/1.1\r\nHost: test\r\n\r\n")
                assert slow.recv(4096).startswith(b"HTTP/1.1 200")
                assert httpx.post(f"{srv.url}/app/stream/go", timeout=30).status_code == 200
                rest = b""
                while not rest.endswith(b"0\r\n\r\n"):
                    rest += slow.recv(4096)
                assert b"done" in rest

            sock = socket.create_connection((host, int(port)), timeout=60)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.sendall(b"GET /app/stream/endless HTTP/1.1\r\nHost: test\r\n\r\n")
            head = sock.recv(4096)
            assert head.startswith(b"HTTP/1.1 200"), head[:200]
            rss_before = _rss(srv.process.pid)

            # the client reads nothing more: the plugin must come to a stop
            last = [-1]

            def stopped() -> bool:
                now = sent()["chunks"]
                if now == last[0]:
                    return True
                last[0] = now
                time.sleep(0.5)
                return False

            _until(stopped, "the stream to pause")
            ahead = last[0] * 64 * 1024
            # one window (1 MiB) plus what the sockets and the server hold, not the stream
            assert ahead < 48 * MIB, f"the plugin ran {ahead / MIB:.1f} MiB ahead of its client"
            grown = _rss(srv.process.pid) - rss_before
            assert grown < 32 * MIB, f"the kernel grew by {grown / MIB:.1f} MiB"

            # the client reads again: the stream goes on, intact
            got = 0
            while got < 16 * MIB:
                data = sock.recv(1024 * 1024)
                assert data, "the stream was cut"
                assert data.strip(b"x0123456789abcdef\r\n") == b"", data[:80]
                got += len(data)
            assert sent()["chunks"] > last[0]

            # the client leaves: the plugin's response ends (told by its send)
            sock.close()

            def ended() -> bool:
                r = httpx.get(f"{srv.url}/admin/plugins/stream", headers=auth, timeout=30)
                assert r.status_code == 200, r.text
                return int(r.json()["host"]["calls_in_flight"]) == 0

            _until(ended, "the streamed call to end")
            assert "request failed" not in srv.output()
    finally:
        shutil.rmtree(base, ignore_errors=True)
