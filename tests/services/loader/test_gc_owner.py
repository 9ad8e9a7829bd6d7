"""With every service running (as a default ``xcore serve``), the loader owns the garbage
collector (kernel/collector.py): what the boot built is frozen before the first plugin
is imported, the plugins' objects are never frozen (the scheduler's GC policy defers
to the owner instead of freezing the settled heap), and a reload's garbage is freed
without thawing the boot layer — no collection of the whole heap per reload."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import anyio
import httpx

from kernel import Kernel, Settings, create_app
from kernel.collector import collector

from .conftest import AUTH, TOKEN, write_plugin

ROUTER = """
    from fastapi import APIRouter
    router = APIRouter()

    @router.get("/x")
    async def x():
        return {"ok": True}
    """

TASKS = """
    from kernel.sdk import task

    @task(every="1h")
    async def tick():
        return None
    """


def tracked(obj: Any) -> bool:
    """Whether collections walk ``obj`` (frozen objects are not listed)."""
    return any(o is obj for o in gc.get_objects())


async def test_plugins_stay_collectable_and_reloads_never_thaw_the_boot(
    tmp_path: Path, plugins: Path
) -> None:
    write_plugin(plugins, "web", run=TASKS, router=ROUTER)
    kernel = Kernel(
        Settings(
            data_dir=tmp_path / "var",
            plugins_dir=plugins,
            admin_token=TOKEN,
            reload=False,
            node="test",
        )
    )
    app = create_app(kernel)
    with anyio.fail_after(120):
        async with (
            kernel.lifespan(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
        ):
            assert {"scheduler", "router", "loader"} <= set(kernel.services)
            scheduler: Any = kernel.services["scheduler"]
            scheduler._gc.settle = 0.05  # its policy would have frozen the heap by now
            assert collector.held
            boot = collector.boot_frozen
            assert boot > 0 and not tracked(kernel)  # the kernel: frozen before plugins
            loader: Any = kernel.services["loader"].loader
            run = loader.loaded["web"].imported.run
            assert tracked(run.tick) and tracked(loader.loaded["web"].imported.router)
            await anyio.sleep(0.5)  # the scheduler's settle time, several times over
            assert tracked(run.tick)  # still collectable
            ref = weakref.ref(run)
            del run
            start = collector.collections
            for _ in range(3):
                r = await c.post("/admin/plugins/web/reload", headers=AUTH)
                assert r.status_code == 200, r.text
                # never thawed: the boot layer stays out of every collection
                assert gc.get_freeze_count() >= boot // 2 and not tracked(kernel)
            # the unloaded generations' garbage: one collection of ours, once settled
            while collector.pending() or collector.collections == start:
                await anyio.sleep(0.05)
            assert ref() is None
            assert not tracked(kernel) and scheduler._gc.freezes == 0
            r = await c.get("/health", headers=AUTH)
            state = r.json()["components"]["loader"]["gc"]
            assert state["owned"] and state["collections"] >= 1
            assert (await c.get("/app/web/x")).json() == {"ok": True}
    assert not collector.held and gc.get_freeze_count() == 0
