"""Hostile plugin builds (attack a8c): what a plugin's import or validator build raises or
does never stops the server, and every such failure names the plugin, file and line."""

from __future__ import annotations

import builtins
import gc
import sys
import textwrap
import weakref
from pathlib import Path
from typing import Any

import anyio
import pytest

from .conftest import AUTH, status_router, write_plugin

#: An exception a plugin's code raises in its build thread that is not an ``Exception``.
ABORTS = ["KeyboardInterrupt()", "SystemExit(3)", "asyncio.CancelledError()", "Stop()"]

IN_VALIDATOR = """
    import asyncio
    from fastapi import APIRouter

    router = APIRouter()

    class Stop(BaseException):
        pass

    class Odd:
        @classmethod
        def __get_pydantic_core_schema__(cls, source, handler):
            raise {abort}

    @router.post("/odd")
    async def odd(thing: Odd) -> dict[str, str]:
        return {{}}
    """

AT_IMPORT = """
    import asyncio
    from fastapi import APIRouter

    router = APIRouter()

    class Stop(BaseException):
        pass

    raise {abort}
    """


@pytest.mark.parametrize("where", ["validator", "import"])
@pytest.mark.parametrize("abort", ABORTS)
async def test_a_base_exception_raised_by_a_build_fails_that_plugin_only(
    harness_factory: Any, plugins: Path, abort: str, where: str
) -> None:
    write_plugin(plugins, "calm", router=status_router())
    source = (IN_VALIDATOR if where == "validator" else AT_IMPORT).format(abort=abort)
    write_plugin(plugins, "odd", router=source)
    h = await harness_factory()  # the boot goes on: the kernel started
    row = (await h.client.get("/admin/plugins/odd", headers=AUTH)).json()
    assert row["status"] == "failed", row
    name = abort.split("(")[0].rsplit(".", 1)[-1]
    assert name in row["last_error"]["error"], row
    [failed] = await h.events("PluginLoadFailed", name="odd")
    assert failed.data["stage"] == "import" and failed.data["file"] == "router.py", failed.data
    if where == "validator":  # the route and field are named
        assert "POST /app/odd/odd: field 'thing'" in failed.data["error"], failed.data
    assert (await h.client.get("/app/calm/status")).json() == {"v": 1}
    # on reload too: the old generation serves on, the server with it
    (plugins / "odd" / "router.py").write_text(textwrap.dedent(status_router()))
    r = await h.client.post("/admin/plugins/odd/reload", headers=AUTH)
    assert r.status_code == 200, r.text
    (plugins / "odd" / "router.py").write_text(textwrap.dedent(source))
    r = await h.client.post("/admin/plugins/odd/reload", headers=AUTH)
    assert r.status_code == 422, r.text
    assert name in r.text, r.text
    assert (await h.client.get("/app/odd/status")).json() == {"v": 1}
    assert (await h.client.get("/app/calm/status")).json() == {"v": 1}


ENDLESS = """
    from fastapi import APIRouter
    from pydantic import BaseModel

    router = APIRouter()

    class M(BaseModel):
        a: int

    async def echo(m: M) -> M:
        return m

    i = 0
    while True:  # a generator of routes with a bug: it never ends
        try:
            router.add_api_route(f"/r{i}", echo, methods=["POST"])
        except Exception:
            pass
        i += 1
    """


@pytest.mark.parametrize("share", [0.3, 1.0])
async def test_an_import_given_up_on_stops_at_its_next_route(
    harness_factory: Any, plugins: Path, share: float
) -> None:
    """Past import_timeout the thread would declare routes (and grow the process) forever."""
    write_plugin(plugins, "calm", router=status_router())
    write_plugin(plugins, "endless", router=ENDLESS)
    h = await harness_factory(loader={"import_timeout": 1, "build_cpu_share": share})
    row = (await h.client.get("/admin/plugins/endless", headers=AUTH)).json()
    assert row["status"] == "failed" and "did not finish" in row["last_error"]["error"], row
    with anyio.fail_after(30):
        while h.loader.threads.stuck:  # the thread ended at its next route
            await anyio.sleep(0.05)
    assert (await h.client.get("/app/calm/status")).json() == {"v": 1}


async def test_a_reload_given_up_on_leaves_the_old_generation_whole(
    harness_factory: Any, plugins: Path
) -> None:
    folder = write_plugin(plugins, "endless", router=status_router())
    h = await harness_factory(loader={"import_timeout": 1})
    old = sys.modules["xcore_plugins.endless.router"]
    (folder / "router.py").write_text(textwrap.dedent(ENDLESS))
    r = await h.client.post("/admin/plugins/endless/reload", headers=AUTH)
    assert r.status_code == 422 and "did not finish" in r.text, r.text
    with anyio.fail_after(30):
        while h.loader.threads.stuck:
            await anyio.sleep(0.05)
    assert (await h.client.get("/app/endless/status")).json() == {"v": 1}
    # the stopped import's clean-up did not take the serving generation's module away
    assert sys.modules.get("xcore_plugins.endless.router") is old


FREEZES = """
    import gc
    from fastapi import APIRouter

    router = APIRouter()

    class Node:
        def __init__(self):
            self.me = self  # a cycle: only a collection frees it

    keep = Node()
    gc.freeze()  # "faster collections", copied from a blog post

    @router.get("/status")
    async def status():
        return {"v": 1}
    """


async def test_garbage_a_plugin_froze_is_freed_once_unloaded(
    harness_factory: Any, plugins: Path
) -> None:
    write_plugin(plugins, "frozen", router=FREEZES)
    h = await harness_factory()
    ref = weakref.ref(sys.modules["xcore_plugins.frozen.router"].keep)
    r = await h.client.post("/admin/plugins/frozen/reload", headers=AUTH)
    assert r.status_code == 200, r.text
    with anyio.fail_after(30):
        while ref() is not None:  # generation 1's cycle: frozen by the plugin itself
            await anyio.sleep(0.05)
    stats = (await h.client.get("/health", headers=AUTH)).json()["components"]["loader"]["gc"]
    assert stats["foreign_freeze"] is True, stats
    assert (await h.client.get("/app/frozen/status")).json() == {"v": 1}


DISABLES = """
    import gc
    from fastapi import APIRouter

    router = APIRouter()
    gc.disable()  # "no GC pauses"

    @router.get("/status")
    async def status():
        return {"v": 1}
    """


async def test_a_plugin_cannot_leave_the_garbage_collector_disabled(
    harness_factory: Any, plugins: Path
) -> None:
    write_plugin(plugins, "nogc", router=DISABLES)
    try:
        h = await harness_factory()
        assert (await h.client.get("/app/nogc/status")).json() == {"v": 1}
        with anyio.fail_after(30):
            while not gc.isenabled():
                await anyio.sleep(0.05)
        stats = (await h.client.get("/health", headers=AUTH)).json()["components"]["loader"]
        assert stats["gc"]["reenabled"] >= 1, stats
    finally:
        gc.enable()


LEAKS = """
    import builtins
    import sys
    from fastapi import APIRouter

    router = APIRouter()
    # a "cache" on a module every generation shares: each generation stays alive
    builtins.__dict__.setdefault("_a8c_leak", []).append(sys.modules[__name__])

    @router.get("/status")
    async def status():
        return {"v": 1}
    """


async def test_an_unloaded_generation_kept_alive_is_reported(
    harness_factory: Any, plugins: Path
) -> None:
    write_plugin(plugins, "leaky", router=LEAKS)
    write_plugin(plugins, "clean", router=status_router())
    try:
        h = await harness_factory()
        for name in ("leaky", "clean"):
            r = await h.client.post(f"/admin/plugins/{name}/reload", headers=AUTH)
            assert r.status_code == 200, r.text
        with anyio.fail_after(30):
            while True:
                health = (await h.client.get("/health", headers=AUTH)).json()
                leaked = health["components"]["loader"].get("leaked_generations", {})
                if leaked:
                    break
                await anyio.sleep(0.05)
        assert leaked == {"leaky": [1]}, leaked  # the clean plugin's generation 1 was freed
    finally:
        vars(builtins).pop("_a8c_leak", None)


@pytest.mark.parametrize("abort", ABORTS)
async def test_a_base_exception_raised_by_an_async_hook_fails_that_plugin_only(
    harness_factory: Any, plugins: Path, abort: str
) -> None:
    write_plugin(plugins, "calm", router=status_router())
    run = f"""
        import asyncio

        class Stop(BaseException):
            pass

        async def on_load(ctx):
            raise {abort}
        """
    write_plugin(plugins, "odd", run=run, router=status_router())
    h = await harness_factory()
    row = (await h.client.get("/admin/plugins/odd", headers=AUTH)).json()
    assert row["status"] == "failed", row
    assert abort.split("(")[0].rsplit(".", 1)[-1] in row["last_error"]["error"], row
    assert (await h.client.get("/app/calm/status")).json() == {"v": 1}
    r = await h.client.post("/admin/plugins/odd/reload", headers=AUTH)
    assert r.status_code == 422, r.text
    assert (await h.client.get("/app/calm/status")).json() == {"v": 1}
