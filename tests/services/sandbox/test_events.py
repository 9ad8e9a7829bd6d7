"""A sandboxed plugin appends events and reacts to them, like a trusted one, within bounds.

Over a real kernel and a real worker: ``ctx.append`` records to the plugin's streams with
actor ``plugin:<name>``; ``ctx.subscribe`` delivers live events (typed in the worker);
appending to another plugin's stream or a kernel event type is refused and records
nothing; the kernel's own events are not delivered unless the operator lists them.
"""

from __future__ import annotations

from typing import Any

import anyio

from kernel.events import NewEvent
from tests.services.sandbox.conftest import AUTH, sandboxed, write_plugin

RUN = """
    from kernel.events import Event

    # names no other test registers in this process (the registry is global)
    class SbPinged(Event):
        n: int

    class SbPonged(Event):
        n: int
        by: str

    class SbSaw(Event):
        type_seen: str
        stream_seen: str

    class PluginReloadRequested(Event):  # a kernel command's name, forged
        name: str

    async def on_load(ctx):
        async def react(record):
            event = record.event  # typed: the class lives in this worker
            await ctx.append(SbPonged(n=event.n, by=type(event).__name__), stream="plugin-ev.replies")

        async def watch(record):
            if record.type not in ("SbSaw", "SbPonged"):
                await ctx.append(SbSaw(type_seen=record.type, stream_seen=record.stream))

        await ctx.subscribe(react, types=[SbPinged])
        await ctx.subscribe(watch)
"""

ROUTER = """
    from fastapi import APIRouter
    from kernel.sdk import current_plugin
    from .run import SbPinged, PluginReloadRequested

    router = APIRouter()

    @router.post("/ping/{n}")
    async def ping(n: int):
        [record] = await current_plugin().append(SbPinged(n=n))
        return {"position": record.position, "stream": record.stream, "actor": record.meta.actor}

    @router.post("/forge/{how}")
    async def forge(how: str):
        ctx = current_plugin()
        try:
            if how == "stream":
                await ctx.append(SbPinged(n=1), stream="plugin-other")
            elif how == "odd":
                await ctx.append(SbPinged(n=1), stream="plugin-ev.\x1b[31m")
            else:
                await ctx.append(PluginReloadRequested(name="other"))
        except PermissionError as exc:
            return {"refused": str(exc)}
        return {"refused": None}
"""


async def test_a_sandboxed_plugin_appends_and_reacts_to_events(harness: Any, level: str) -> None:
    h = await harness(level)
    write_plugin(h.plugins, "ev", info=sandboxed("ev"), run=RUN, router=ROUTER)
    assert (await h.reload("ev")).status_code == 200
    with anyio.fail_after(60):
        r = await h.client.post("/app/ev/ping/7")
        assert r.status_code == 200, r.text
        assert r.json()["stream"] == "plugin-ev"
        assert r.json()["actor"] == "plugin:ev"
        [pinged] = [e for e in await h.kernel.read(types=["SbPinged"]) if e.data["n"] == 7]
        assert pinged.stream == "plugin-ev" and pinged.meta.actor == "plugin:ev"
        # its subscription saw it, typed, and appended an answer to a stream of its own
        while not [e for e in await h.kernel.read(types=["SbPonged"]) if e.data["n"] == 7]:
            await anyio.sleep(0.05)
        [ponged] = [e for e in await h.kernel.read(types=["SbPonged"]) if e.data["n"] == 7]
        assert ponged.data["by"] == "SbPinged" and ponged.stream == "plugin-ev.replies"
        # it reacts to events the kernel records elsewhere too (not only its own)
        await h.kernel.append(NewEvent.raw("SbPinged", {"n": 9}), stream="elsewhere")
        while not [e for e in await h.kernel.read(types=["SbPonged"]) if e.data["n"] == 9]:
            await anyio.sleep(0.05)
        # a kernel event (a token) is not delivered; a plugin's event after it is
        created = await h.client.post(
            "/admin/tokens", headers=AUTH, json={"name": "t", "scopes": ["plugins:read"]}
        )
        assert created.status_code in (200, 201), created.text
        await h.kernel.append(NewEvent.raw("Marker", {}), stream="elsewhere")
        while not [
            e for e in await h.kernel.read(types=["SbSaw"]) if e.data["type_seen"] == "Marker"
        ]:
            await anyio.sleep(0.05)
    seen = {e.data["type_seen"] for e in await h.kernel.read(types=["SbSaw"])}
    assert "SbPinged" in seen and "Marker" in seen
    assert "TokenCreated" not in seen, seen


async def test_a_sandboxed_plugin_cannot_forge_events(harness: Any) -> None:
    h = await harness("rlimits")
    write_plugin(h.plugins, "ev", info=sandboxed("ev"), run=RUN, router=ROUTER)
    assert (await h.reload("ev")).status_code == 200
    before = await h.kernel.read()
    with anyio.fail_after(60):
        stream = (await h.client.post("/app/ev/forge/stream")).json()["refused"]
        kind = (await h.client.post("/app/ev/forge/type")).json()["refused"]
        odd = (await h.client.post("/app/ev/forge/odd")).json()["refused"]
    assert odd is not None and "own streams" in odd
    assert stream is not None and "plugin-other" in stream and "own streams" in stream
    assert kind is not None and "PluginReloadRequested" in kind and "services.loader" in kind
    after = await h.kernel.read(after=before[-1].position)
    forged = [e for e in after if e.type == "PluginReloadRequested" or e.stream == "plugin-other"]
    assert not forged, forged
    assert not [e for e in after if e.meta.actor == "plugin:ev" and e.type != "SbSaw"]


async def test_the_operator_may_show_kernel_events_to_sandboxed_plugins(harness: Any) -> None:
    h = await harness("rlimits", sandbox={"kernel_events": ["TokenCreated"]})
    write_plugin(h.plugins, "ev", info=sandboxed("ev"), run=RUN, router=ROUTER)
    assert (await h.reload("ev")).status_code == 200
    with anyio.fail_after(60):
        created = await h.client.post(
            "/admin/tokens", headers=AUTH, json={"name": "t", "scopes": ["plugins:read"]}
        )
        assert created.status_code in (200, 201), created.text
        while not [
            e for e in await h.kernel.read(types=["SbSaw"]) if e.data["type_seen"] == "TokenCreated"
        ]:
            await anyio.sleep(0.05)
