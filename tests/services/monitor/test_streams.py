"""The live event stream: resume without loss or repeat; a stalled client costs no memory."""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from kernel.client import SSEMessage, follow, iter_sse
from kernel.events import Event
from tests.services.monitor.conftest import AUTH, TOKEN, monitored

pytestmark = pytest.mark.anyio


class Ticked(Event):
    n: int
    pad: str = ""


class Other(Event):
    n: int


async def _read_events(
    m: Any, headers: dict[str, str], params: dict[str, Any], count: int
) -> list[Any]:
    """Read ``count`` events from the stream, then drop the connection."""
    out: list[Any] = []
    async with m.client.stream(
        "GET", "/admin/events/stream", params=params, headers={**AUTH, **headers}
    ) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        buffered: list[bytes] = []
        async for line in response.aiter_lines():
            buffered.append(line.encode() + b"\n")
            if line == "":
                out += [msg for msg in iter_sse(buffered)]
                buffered = []
                if len(out) >= count:
                    return out[:count]
    return out


async def test_a_client_cut_mid_stream_resumes_with_last_event_id(tmp_path: Path) -> None:
    async with monitored(tmp_path) as m:
        first = (await m.kernel.append(Ticked(n=0), stream="ticks"))[0].position
        for n in range(1, 30):
            await m.kernel.append(Ticked(n=n), stream="ticks")
            await m.kernel.append(Other(n=n), stream="others")
        params = {"after": first - 1, "type": "Ticked"}
        with anyio.fail_after(30):
            part = await _read_events(m, {}, params, 12)
        assert [msg.data["data"]["n"] for msg in part] == list(range(12))
        # more events while the client is away
        for n in range(30, 40):
            await m.kernel.append(Ticked(n=n), stream="ticks")
        with anyio.fail_after(30):
            rest = await _read_events(
                m, {"Last-Event-ID": str(part[-1].id)}, {"type": "Ticked"}, 28
            )
        got = [msg.data["data"]["n"] for msg in part + rest]
        assert got == list(range(40))  # nothing missed, nothing twice, in order
        ids = [msg.id for msg in part + rest]
        assert ids == sorted(set(ids))
        assert all(msg.event == "Ticked" for msg in rest)


async def test_a_stalled_client_does_not_make_the_server_buffer(tmp_path: Path) -> None:
    async with monitored(tmp_path) as m:
        start = await m.kernel.store.last_position()
        host, port = m.url.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        try:
            sock.sendall(
                f"GET /admin/events/stream?after={start}&type=Ticked HTTP/1.1\r\n"
                f"Host: {host}\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
            )
            pad = "x" * 50_000
            for batch in range(16):  # ~40 MB of events the client never reads
                await m.kernel.append(
                    [Ticked(n=batch * 50 + i, pad=pad) for i in range(50)], stream="ticks"
                )
            last = await m.kernel.store.last_position()
            with anyio.fail_after(30):
                while not m.monitor.streams.open:
                    await anyio.sleep(0.01)
            [state] = m.monitor.streams.open.values()
            await anyio.sleep(1.0)  # let the server push all it can
            # the server holds back: it is far behind the log, with a bounded amount sent
            # (what it sent sits in the kernel's socket buffers, a few MB on loopback)
            assert state.position < last - 400, (state.position, last)
            assert state.sent_bytes < 15_000_000, state.sent_bytes
            # once the client reads, it catches up from the log: every event arrives
            received = 0

            def drain() -> None:
                nonlocal received
                buf = b""
                sock.settimeout(30)
                while received < 800:
                    chunk = sock.recv(1 << 20)
                    if not chunk:
                        return
                    buf += chunk
                    received += buf.count(b"event: Ticked\n")
                    buf = buf[buf.rfind(b"\n\n") + 2 :] if b"\n\n" in buf else buf

            with anyio.fail_after(60):
                await anyio.to_thread.run_sync(drain)
            assert received == 800
        finally:
            sock.close()
        with anyio.fail_after(30):
            while m.monitor.streams.open:  # the server notices the client left
                await m.kernel.append(Ticked(n=-1), stream="ticks")
                await anyio.sleep(0.05)


async def test_the_python_client_resumes_across_a_server_restart(tmp_path: Path) -> None:
    got: list[SSEMessage] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def run(url: str) -> None:
        try:
            follow(
                url, TOKEN, got.append, params={"type": "Ticked"}, after=0, stop=stop, max_delay=0.2
            )
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    sock_port = 0
    async with monitored(tmp_path) as m:
        sock_port = int(m.url.rsplit(":", 1)[1])
        for n in range(5):
            await m.kernel.append(Ticked(n=n), stream="ticks")
        thread = threading.Thread(target=run, args=(m.url,), daemon=True)
        thread.start()
        with anyio.fail_after(30):
            while len(got) < 5:
                await anyio.sleep(0.02)
    # the server is gone; events are recorded by the next process on the same log,
    # served on the same port, so the client finds it again
    try:
        async with monitored(tmp_path, port=sock_port) as m:
            for n in range(5, 12):
                await m.kernel.append(Ticked(n=n), stream="ticks")
            with anyio.fail_after(60):
                while len(got) < 12:
                    await anyio.sleep(0.02)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not errors, errors
    assert [msg.data["data"]["n"] for msg in got] == list(range(12))


async def test_a_resume_point_beyond_the_end_or_not_plain_digits_is_refused(
    tmp_path: Path,
) -> None:
    """A Last-Event-ID (or ?after=) past the head would make the stream wait, silent,
    until the log reached it (after a data reset: forever); "1_000" or "+3" are not ids
    this server sent."""
    async with monitored(tmp_path) as m:
        await m.kernel.append(Ticked(n=0), stream="ticks")
        with anyio.fail_after(30):
            for route in ("/admin/events/stream", "/admin/logs/stream"):
                for header in ("99999999999999999999", "1_000", "+3"):
                    r = await m.client.get(route, headers={**AUTH, "Last-Event-ID": header})
                    assert r.status_code == 422, (route, header, r.text)
                r = await m.client.get(route, params={"after": 10**15}, headers=AUTH)
                assert r.status_code == 422, (route, r.text)


async def test_a_live_stream_ends_when_its_api_token_is_revoked(tmp_path: Path) -> None:
    async with monitored(tmp_path) as m:
        issued = await m.client.post(
            "/admin/tokens", json={"name": "s", "scopes": ["admin:read"]}, headers=AUTH
        )
        token, token_id = issued.json()["token"], issued.json()["id"]
        with anyio.fail_after(30):
            async with m.client.stream(
                "GET",
                "/admin/events/stream",
                params={"after": 0},
                headers={"Authorization": f"Bearer {token}"},
            ) as response:
                assert response.status_code == 200
                revoked = await m.client.delete(f"/admin/tokens/{token_id}", headers=AUTH)
                assert revoked.status_code == 200
                for n in range(3):
                    await m.kernel.append(Ticked(n=n), stream="ticks")
                async for _ in response.aiter_lines():
                    pass  # the stream must end by itself
