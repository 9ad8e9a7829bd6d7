"""Plugins that use each other: declared requirements, reloads as one change, no sharing
through sys.path; and what the watcher does (code changes only, reload loops damped)."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import anyio

from .conftest import AUTH, status_router, write_plugin

GREETER = {"version": "1.0.0", "api_prefix": "/app/greeter"}
USER = {"version": "1.0.0", "api_prefix": "/app/user", "requires": {"greeter": ">=1"}}
USER_ROUTER = """
    from fastapi import APIRouter
    from xcore_plugins.greeter.words import WORD
    router = APIRouter()

    @router.get("/hello")
    async def hello():
        return WORD
    """


async def test_importing_a_plugin_without_requires_is_refused_in_any_order(
    harness_factory, plugins: Path
) -> None:
    write_plugin(plugins, "greeter", info=GREETER, files={"words.py": "WORD = 'Bonjour'\n"})
    # 'aaa' sorts (and would load) before greeter, 'zzz' after it: both refused the same way
    for name in ("aaa", "zzz"):
        write_plugin(
            plugins,
            name,
            info={"version": "1.0.0", "api_prefix": f"/app/{name}"},
            router=USER_ROUTER,
        )
    h = await harness_factory()
    failed = {r.data["name"]: r.data for r in await h.events("PluginLoadFailed")}
    for name in ("aaa", "zzz"):
        assert failed[name]["stage"] == "import", failed[name]
        assert "imports plugin 'greeter'" in failed[name]["error"]
        assert "'requires'" in failed[name]["error"]
        assert failed[name]["file"] == "router.py" and failed[name]["line"] == 3


async def test_reloading_a_plugin_reloads_its_dependents(harness_factory, plugins: Path) -> None:
    greeter = write_plugin(
        plugins, "greeter", info=GREETER, files={"words.py": "WORD = 'Bonjour'\n"}
    )
    write_plugin(plugins, "user", info=USER, router=USER_ROUTER)
    h = await harness_factory()
    assert (await h.client.get("/app/user/hello")).json() == "Bonjour"
    (greeter / "words.py").write_text("WORD = 'Hi'\n")
    r = await h.client.post("/admin/plugins/greeter/reload", headers=AUTH)
    assert r.status_code == 200 and r.json()["name"] == "greeter"
    assert (await h.client.get("/app/user/hello")).json() == "Hi"
    await h.wait_for("PluginReloaded", "user")  # recorded just after greeter's (the answer)
    reloaded = [x.data["name"] for x in await h.events("PluginReloaded")]
    assert reloaded == ["greeter", "user"]

    # a change the dependent cannot take: both keep their generation, nothing changed
    (greeter / "words.py").write_text("OTHER = 'x'\n")
    r = await h.client.post("/admin/plugins/greeter/reload", headers=AUTH)
    assert r.status_code == 422
    body = r.json()
    assert body["stage"] == "import" and "plugin 'user' requires 'greeter'" in body["error"]
    assert "nothing changed" in body["error"]
    assert (await h.client.get("/app/user/hello")).json() == "Hi"
    assert h.loader.loaded["greeter"].generation == 2 and h.loader.loaded["user"].generation == 2
    # the old modules are current again: the next reload of user alone still works
    r = await h.client.post("/admin/plugins/user/reload", headers=AUTH)
    assert r.status_code == 200
    assert (await h.client.get("/app/user/hello")).json() == "Hi"


async def test_modules_shared_through_sys_path_are_refused(harness_factory, plugins: Path) -> None:
    for name in ("one", "two"):
        write_plugin(
            plugins,
            name,
            run="""
                import pathlib, sys
                sys.path.insert(0, str(pathlib.Path(__file__).parent))
                import helpers
                """,
            files={"helpers.py": f"WHO = {name!r}\n"},
        )
    h = await harness_factory()
    failed = {r.data["name"]: r.data for r in await h.events("PluginLoadFailed")}
    assert set(failed) == {"one", "two"}
    errors = " ".join(f["error"] for f in failed.values())
    assert "the top-level import 'helpers' resolves to" in errors
    assert "from . import helpers" in errors


async def test_an_old_generation_is_freed_after_a_reload(harness_factory, plugins: Path) -> None:
    write_plugin(
        plugins,
        "freed",
        router="""
            from fastapi import APIRouter, Depends
            from pydantic import BaseModel
            router = APIRouter()

            class Item(BaseModel):
                x: int

            def dep() -> int:
                return 1

            @router.get("/item")
            async def item(d: int = Depends(dep)) -> Item:
                return Item(x=d)
            """,
    )
    h = await harness_factory()
    assert (await h.client.get("/app/freed/item")).json() == {"x": 1}
    refs = []
    for _ in range(3):
        refs.append(weakref.ref(h.loader.loaded["freed"].imported.router.routes[0].endpoint))
        r = await h.client.post("/admin/plugins/freed/reload", headers=AUTH)
        assert r.status_code == 200
        assert (await h.client.get("/app/freed/item")).json() == {"x": 1}
    gc.collect()
    assert [ref() is None for ref in refs] == [True, True, True]


async def test_the_watcher_ignores_data_files_and_damps_reload_loops(
    harness_factory, plugins: Path
) -> None:
    folder = write_plugin(plugins, "busy", router=status_router())
    h = await harness_factory(reload=True, loader={"max_reloads_per_minute": 2})
    with anyio.fail_after(10):
        await h.loader_service.watching.wait()
    # a plugin writing its own state: no reload (data belongs in context.data_dir)
    for i in range(5):
        (folder / "cache.json").write_text(f'{{"n": {i}}}')
        await anyio.sleep(0.1)
    (folder / "router.py").write_text(status_router('{"v": 2}').replace("        ", ""))
    await h.wait_for("PluginReloaded", "busy")
    requests = await h.events("PluginReloadRequested", name="busy")
    assert len(requests) == 1 and "router.py" in requests[0].data["reason"]
    assert "cache.json" not in requests[0].data["reason"]
    assert h.loader.loaded["busy"].context.data_dir == h.loader.data_dir / "plugins" / "busy"
    # code changing on its own again and again: paused past the limit (2), and reported
    (folder / "router.py").write_text(status_router('{"v": 3}').replace("        ", ""))
    await h.wait_for("PluginReloaded", "busy", count=2)
    (folder / "router.py").write_text(status_router('{"v": 4}').replace("        ", ""))
    with anyio.fail_after(10):
        while not await h.events("PluginReloadPaused"):
            await anyio.sleep(0.05)
    [paused] = await h.events("PluginReloadPaused")
    assert paused.data["name"] == "busy" and "context.data_dir" in paused.data["reason"]
    assert (await h.client.get("/admin/plugins/busy", headers=AUTH)).json()["reloads_paused"]
    # a person asks: reloads resume
    assert len(await h.events("PluginReloadRequested", name="busy")) == 2
    r = await h.client.post("/admin/plugins/busy/reload", headers=AUTH)
    assert r.status_code == 200 and not h.loader.paused
    assert (await h.client.get("/app/busy/status")).json() == {"v": 4}
