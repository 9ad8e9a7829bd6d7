"""The wire to a worker: many calls in flight, late replies dropped, heartbeat, logs."""

from __future__ import annotations

import asyncio
import io
import logging
import zipfile
from typing import Any

import anyio
import pytest

from services.sandbox.protocol import MAX_FRAME, FrameError, FrameReader, decode, encode, sizes
from tests.services.sandbox.conftest import AUTH, sandboxed, write_plugin

ROUTER = """
    import asyncio, logging, time
    from fastapi import APIRouter
    router = APIRouter()
    state = {"now": 0, "max": 0}
    log = logging.getLogger("xcore.plugin.wire.routes")

    @router.get("/slow/{tag}")
    async def slow(tag: str, delay: float = 0.3):
        state["now"] += 1
        state["max"] = max(state["max"], state["now"])
        try:
            await asyncio.sleep(delay)
        finally:
            state["now"] -= 1
        return {"tag": tag}

    @router.get("/max")
    async def most():
        return state

    @router.get("/log")
    async def logged():
        log.warning("hello from the worker")
        return {}

    @router.get("/block")
    async def block():
        time.sleep(60)  # blocks the worker's event loop: only the heartbeat notices
"""


def test_frames_round_trip_and_refuse_garbage() -> None:
    frame = encode({"op": "body", "id": 7}, b"\x00\xff" * 10)
    size, head = sizes(frame[:8])
    assert decode(frame[4:], head) == ({"op": "body", "id": 7}, b"\x00\xff" * 10)
    assert size == len(frame) - 4
    with pytest.raises(FrameError):
        sizes((MAX_FRAME + 1).to_bytes(4, "big") + (2).to_bytes(4, "big"))
    with pytest.raises(FrameError):
        decode(b"\0\0\0\0not json", 8)
    with pytest.raises(FrameError):
        encode({}, b"x" * MAX_FRAME)


async def test_many_calls_in_flight_and_late_replies_are_dropped(harness: Any, caplog: Any) -> None:
    caplog.set_level(logging.INFO)
    h = await harness("rlimits")
    write_plugin(h.plugins, "wire", info=sandboxed("wire"), router=ROUTER)
    assert (await h.reload("wire")).status_code == 200
    results: dict[str, Any] = {}

    async def get(tag: str) -> None:
        results[tag] = (await h.client.get(f"/app/wire/slow/{tag}")).json()["tag"]

    async with anyio.create_task_group() as tg:
        for i in range(10):
            tg.start_soon(get, f"t{i}")
    assert results == {f"t{i}": f"t{i}" for i in range(10)}
    assert (await h.client.get("/app/wire/max")).json()["max"] > 1

    # a caller that gives up: its late answer must not reach anyone else
    with anyio.move_on_after(0.1):
        await h.client.get("/app/wire/slow/late", params={"delay": 0.5})
    for i in range(10):
        r = await h.client.get(f"/app/wire/slow/after{i}", params={"delay": 0.1})
        assert r.json() == {"tag": f"after{i}"}

    r = await h.client.get("/app/wire/log", headers={"x-request-id": "req-42"})
    assert r.status_code == 200
    with anyio.fail_after(10):
        while not [x for x in caplog.records if x.getMessage() == "hello from the worker"]:
            await anyio.sleep(0.02)
    record = next(x for x in caplog.records if x.getMessage() == "hello from the worker")
    assert record.name.startswith("xcore.plugin.wire")
    assert record.plugin == "wire"
    assert record.request_id == "req-42"


async def test_a_worker_stuck_off_its_loop_is_killed_by_the_heartbeat(harness: Any) -> None:
    h = await harness("rlimits", sandbox={"heartbeat_timeout_s": 1, "heartbeat_interval_s": 0.2})
    write_plugin(h.plugins, "wire", info=sandboxed("wire"), router=ROUTER)
    assert (await h.reload("wire")).status_code == 200
    r = await h.client.get("/app/wire/block")
    assert r.status_code == 502
    breach = await h.wait_for("SandboxLimitExceeded", "wire")
    assert breach[0].data["limit"] == "heartbeat"
    assert breach[0].data["value"] == 1


def zipped(name: str, run: str, router: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(f"{name}/__init__.py", "")
        zf.writestr(f"{name}/run.py", run)
        zf.writestr(f"{name}/router.py", router)
    return buf.getvalue()


async def test_the_operator_sandboxes_archive_installs(harness: Any) -> None:
    h = await harness("rlimits", loader={"archive_mode": "sandboxed"})
    run = "PLUGIN_INFO = {'version': '1.0.0', 'api_prefix': '/app/third'}\n"
    router = "import os\nfrom fastapi import APIRouter\nrouter = APIRouter()\n\n@router.get('/pid')\nasync def pid():\n    return os.getpid()\n"
    r = await h.client.post(
        "/admin/plugins", headers=AUTH, files={"file": ("third.zip", zipped("third", run, router))}
    )
    assert r.status_code == 200, r.text
    row = (await h.client.get("/admin/plugins/third", headers=AUTH)).json()
    assert row["mode"] == "sandboxed"
    assert row["host"]["state"] == "running"
    assert (await h.client.get("/app/third/pid")).json() == row["host"]["pid"] or h.level == "bwrap"
    # a plugin copied in by hand keeps its manifest's mode
    write_plugin(
        h.plugins, "local", info={"version": "1.0.0", "api_prefix": "/app/local"}, router=router
    )
    assert (await h.reload("local")).status_code == 200
    assert (await h.client.get("/admin/plugins/local", headers=AUTH)).json()["mode"] == "trusted"


async def test_a_frame_for_an_unknown_id_is_dropped_never_delivered_elsewhere() -> None:
    from pathlib import Path

    from services.sandbox.isolation import Launch
    from services.sandbox.worker_process import Worker, _Call

    worker = Worker(
        plugin="p",
        generation=1,
        launch=Launch(["true"], Path("/"), {}, "rlimits"),
        config={},
        wall_time=30,
        heartbeat_interval=1,
        heartbeat_timeout=10,
        start_timeout=10,
        limits={},
    )
    done: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
    waiting = _Call(None, 1e12, "task waiting", done)
    worker._calls[2] = waiting
    worker._dispatch({"op": "result", "id": 1, "ok": True, "late": True}, b"")  # cancelled call 1
    assert not done.done()
    worker._dispatch({"op": "result", "id": 2, "ok": True}, b"")
    assert done.result() == {"op": "result", "id": 2, "ok": True}
    assert 2 not in worker._calls


def test_the_frame_reader_cuts_frames_whatever_the_reads() -> None:
    frames = [encode({"op": "body", "id": i}, bytes([i]) * (i * 997)) for i in range(40)]
    stream = b"".join(frames)
    for step in (1, 7, 4096, 65536, len(stream)):
        reader = FrameReader()
        got = []
        for i in range(0, len(stream), step):
            got += reader.feed(stream[i : i + step])
        assert [h["id"] for h, _ in got] == list(range(40))
        assert [p for _, p in got] == [bytes([i]) * (i * 997) for i in range(40)]
    with pytest.raises(FrameError):
        FrameReader().feed(b"\0\0\0\x06\0\0\0\x02[]")
    with pytest.raises(FrameError):
        FrameReader().feed((MAX_FRAME + 1).to_bytes(4, "big") + b"\0\0\0\0")


async def test_a_call_that_cannot_be_framed_fails_alone_and_the_worker_serves_on(
    harness: Any,
) -> None:
    # the frame is refused before the call is registered: no cancel is sent for a call
    # the worker never saw, so the cancel's grace does not run out and kill the worker
    h = await harness("rlimits", sandbox={"cancel_grace_s": 0.1})
    write_plugin(h.plugins, "wire", info=sandboxed("wire"), router=ROUTER)
    assert (await h.reload("wire")).status_code == 200
    plugin = next(p for (n, _), p in h.service.plugins.items() if n == "wire")
    worker = plugin.worker
    with pytest.raises(FrameError):
        await plugin.call({"op": "noop", "pad": "x" * MAX_FRAME}, kind="noop")
    assert worker.in_flight == 0
    await anyio.sleep(0.5)  # past the grace a needless cancel would have been given
    assert plugin.worker is worker and worker.alive
    assert (await plugin.call({"op": "noop"}, kind="noop"))["ok"] is True
    assert await h.events("SandboxLimitExceeded", plugin="wire") == []
