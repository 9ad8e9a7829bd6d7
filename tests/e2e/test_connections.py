"""Idle, slow and surplus connections cannot pile up on a live ``xcore serve``.

Real sockets against a real server: 500 clients that connect and send nothing or
trickle their headers (slowloris) are all closed by the server, idle keep-alive
connections are closed, and connections over the limit are answered 503 and closed.
The server's timeouts are set short through the environment so the test is quick;
the test's own bounds are generous (a hang fails it, slowness does not).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import anyio
import httpx

from kernel.settings import HttpSettings
from tests.e2e.server import Server, serve

CLIENTS = 500


async def _open(server: Server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = server.url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def _closed_by_server(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, trickle: bool
) -> bytes:
    """Wait until the server closes the connection; a slowloris keeps sending meanwhile."""
    if trickle:
        writer.write(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")
    received = b""
    try:
        while True:
            if trickle:
                writer.write(b"X-Slow: 1\r\n")  # never the blank line ending the head
                await writer.drain()
            with anyio.move_on_after(0.5):
                chunk = await reader.read(4096)
                if not chunk:
                    return received
                received += chunk
    except (ConnectionError, OSError):
        return received
    finally:
        writer.close()


async def test_idle_and_slowloris_connections_are_closed(tmp_path: Path) -> None:
    env = {"XCORE_HTTP__HEADER_TIMEOUT": "2", "XCORE_HTTP__MAX_CONNECTIONS": "2000"}
    with serve(tmp_path, env=env) as server:
        with anyio.fail_after(30):
            conns = [await _open(server) for _ in range(CLIENTS)]
        closed: list[bytes] = []

        async def watch(i: int) -> None:
            reader, writer = conns[i]
            closed.append(await _closed_by_server(reader, writer, trickle=i % 2 == 1))

        with anyio.fail_after(120):  # the server closes them after 2 s; this is a hang guard
            async with anyio.create_task_group() as tg:
                for i in range(CLIENTS):
                    tg.start_soon(watch, i)
        assert len(closed) == CLIENTS
        assert all(answer == b"" for answer in closed), {a[:60] for a in closed}
        # and the server still serves everyone else
        async with httpx.AsyncClient() as client:
            r = await client.get(f"{server.url}/health/live", timeout=30)
            assert r.status_code == 200
    assert "too slow to send a request head" in server.output()


async def test_an_idle_keep_alive_connection_is_closed(tmp_path: Path) -> None:
    env = {"XCORE_HTTP__KEEP_ALIVE_TIMEOUT": "1", "XCORE_HTTP__HEADER_TIMEOUT": "300"}
    with serve(tmp_path, env=env) as server:
        reader, writer = await _open(server)
        writer.write(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        with anyio.fail_after(30):
            first = await reader.readuntil(b'{"status":"ok"}')
            assert first.startswith(b"HTTP/1.1 200 ")
            assert await reader.read() == b""  # closed by the server, long before 30 s
        writer.close()


async def test_a_keep_alive_connection_may_idle_past_the_header_timeout(tmp_path: Path) -> None:
    # after a response the client has the keep-alive time to begin its next request,
    # not only the head's: a shorter close races clients that reuse idle connections
    env = {"XCORE_HTTP__KEEP_ALIVE_TIMEOUT": "6", "XCORE_HTTP__HEADER_TIMEOUT": "1"}
    request = b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    with serve(tmp_path, env=env) as server:
        reader, writer = await _open(server)
        with anyio.fail_after(30):
            writer.write(request)
            assert (await reader.readuntil(b'{"status":"ok"}')).startswith(b"HTTP/1.1 200 ")
            await anyio.sleep(2.5)  # idle past the header timeout, within the keep-alive
            writer.write(request)
            await writer.drain()
            second = await reader.readuntil(b'{"status":"ok"}')
            assert second.startswith(b"HTTP/1.1 200 "), second
            # and a client that then trickles a head is still closed
            assert await _closed_by_server(reader, writer, trickle=True) == b""


def test_the_default_keep_alive_outlasts_common_clients_reuse() -> None:
    # httpx reuses an idle connection for up to 5 s; closing first loses its requests
    assert HttpSettings().keep_alive_timeout > httpx.Limits().keepalive_expiry + 5


async def test_connections_over_the_limit_are_refused_and_closed(tmp_path: Path) -> None:
    env = {"XCORE_HTTP__MAX_CONNECTIONS": "20", "XCORE_HTTP__HEADER_TIMEOUT": "3"}
    with serve(tmp_path, env=env) as server:
        with anyio.fail_after(30):
            held = [await _open(server) for _ in range(20)]
            await anyio.sleep(0.2)
            reader, writer = await _open(server)
            refused = await reader.read()
            writer.close()
        assert refused.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), refused
        assert b"too many open connections" in refused
        # the held connections are idle: the head timeout frees their places
        with anyio.fail_after(60):
            for r, w in held:
                assert await r.read() == b""
                w.close()
        async with httpx.AsyncClient() as client:
            r = await client.get(f"{server.url}/health/live", timeout=30)
            assert r.status_code == 200
    assert "1 over the connection limit" in server.output()
