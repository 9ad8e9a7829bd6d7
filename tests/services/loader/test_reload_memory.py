"""Reloading a plugin frees its old generation, with every installed service running.

A default ``xcore serve`` runs all services (monitor, scheduler, sandbox, ui...): each
sees every reload. The old generation's modules, its ``Config`` model, its pydantic body
models and its endpoints must all be collectable once the new one serves, whatever the
services keep (FastAPI's per-endpoint caches, logging records, projections).
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import anyio
import httpx

from bench.reload import posts_router  # the workload of reload_rss_growth_posts_mb
from kernel import Kernel, Settings, create_app

from .conftest import AUTH, TOKEN, write_plugin

RELOADS = 3

CONFIG_RUN = """
    from pydantic import BaseModel

    class Config(BaseModel):
        greeting: str = "hi"
    """


async def test_old_generations_are_collected_with_every_service_running(
    tmp_path: Path, plugins: Path
) -> None:
    write_plugin(plugins, "cfg", run=CONFIG_RUN)
    write_plugin(plugins, "posts", run=CONFIG_RUN, router=posts_router())
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
    refs: list[tuple[str, weakref.ref[Any]]] = []
    with anyio.fail_after(120):
        async with (
            kernel.lifespan(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
        ):
            # every installed service runs, as in a default `xcore serve`
            assert {"monitor", "scheduler", "router", "loader"} <= set(kernel.services)
            loader = kernel.services["loader"].loader  # type: ignore[attr-defined]
            for _ in range(RELOADS):
                r = await c.post("/app/posts/r3", json={"id": 1, "tags": ["a"]})
                assert r.status_code == 200 and r.json() == {"id": 1, "tags": ["a"]}
                for name in ("cfg", "posts"):
                    gen = loader.loaded[name]
                    run = gen.imported.run
                    refs.append((f"{name} run module", weakref.ref(run)))
                    refs.append((f"{name} Config", weakref.ref(run.Config)))
                    for label, module in gen.modules.items():
                        refs.append((label, weakref.ref(module)))
                router = loader.loaded["posts"].imported.router
                refs.append(("posts endpoint", weakref.ref(router.routes[3].endpoint)))
                refs.append(
                    ("posts Item", weakref.ref(router.routes[3].endpoint.__annotations__["item"]))
                )
                del gen, run, module, router
                for name in ("cfg", "posts"):
                    r = await c.post(f"/admin/plugins/{name}/reload", headers=AUTH)
                    assert r.status_code == 200, r.text
            r = await c.post("/app/posts/r3", json={"id": 2})
            assert r.status_code == 200
            gc.collect()
            alive = [label for label, ref in refs if ref() is not None]
            assert alive == []
