"""A reloaded generation is freed by reference counting, with no full collection.

The router takes an unmounted generation's app apart once its last request has ended
(services/router/dismantle.py) and the loader empties the plugin's own router
(``release_router``): its routes, fields and validators are freed as they are removed,
and the collector is told so (no full collection is due for that unload).
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from bench.reload import posts_router
from kernel.collector import Collector, collector

from .conftest import AUTH, write_plugin

SLOW = """
    import asyncio
    from pathlib import Path
    from fastapi import APIRouter
    router = APIRouter()
    GENERATION = {generation}

    @router.get("/slow")
    async def slow(flag: str):
        Path(flag + ".in").write_text("")
        while not Path(flag).exists():
            await asyncio.sleep(0.01)
        return {"generation": GENERATION}

    @router.get("/fast")
    async def fast():
        return {"generation": GENERATION}
    """


def full_collections() -> int:
    return int(gc.get_stats()[2]["collections"])


async def leftovers_collected() -> None:
    """Wait until the process's collector has collected what an earlier test's stopped
    kernels left unloaded (its counts are process-wide): the figures read afterwards
    are this test's own."""
    while collector.unloaded_since_full or collector.freed_since_full:
        await anyio.sleep(0.02)


async def test_an_unloaded_generation_is_freed_without_a_full_collection(
    harness_factory: Any, plugins: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_plugin(plugins, "posts", router=posts_router(30))
    h = await harness_factory()
    router: Any = h.kernel.services["router"]
    with anyio.fail_after(60):
        r = await h.client.post("/app/posts/r3", json={"id": 1, "tags": ["a"]})
        assert r.status_code == 200
        gen = h.loader.loaded["posts"]
        app = router._mounts[("posts", gen.generation)].app
        served = weakref.ref(app.router.routes[-1])  # a copy the app serves
        original = weakref.ref(gen.imported.router.routes[0])  # the plugin's own route
        del gen, app
        await leftovers_collected()
        # no collection of ours from here on: only refcounting can free the routes
        monkeypatch.setattr(collector, "tick", 3600.0)
        await anyio.sleep(0.2)  # the collector's task is asleep for an hour now
        full = full_collections()
        freed, kept = router.dismantler.freed, router.dismantler.kept
        r = await h.client.post("/admin/plugins/posts/reload", headers=AUTH)
        assert r.status_code == 200, r.text
        while router.dismantler.freed == freed and router.dismantler.kept == kept:
            await anyio.sleep(0.01)
        assert served() is None and original() is None
        assert full_collections() == full  # freed by refcounting alone
        assert collector.unloaded_since_full == 0  # no collection due for it
        r = await h.client.post("/app/posts/r3", json={"id": 2, "tags": []})
        assert r.status_code == 200 and r.json() == {"id": 2, "tags": []}


async def test_a_request_in_flight_keeps_its_generation_until_it_ends(
    harness_factory: Any, plugins: Path, tmp_path: Path
) -> None:
    write_plugin(plugins, "web", router=SLOW.replace("{generation}", "1"))
    h = await harness_factory()
    router: Any = h.kernel.services["router"]
    flag = tmp_path / "flag"
    with anyio.fail_after(60):
        gen = h.loader.loaded["web"]
        app = router._mounts[("web", gen.generation)].app
        routes = app.router.routes
        served = weakref.ref(routes[-1])
        del gen, app
        answers: list[Any] = []

        async def slow() -> None:
            answers.append(await h.client.get("/app/web/slow", params={"flag": str(flag)}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(slow)
            while not (tmp_path / "flag.in").exists():  # inside the old generation
                await anyio.sleep(0.01)
            write_plugin(plugins, "web", router=SLOW.replace("{generation}", "2"))
            r = await h.client.post("/admin/plugins/web/reload", headers=AUTH)
            assert r.status_code == 200, r.text
            assert (await h.client.get("/app/web/fast")).json() == {"generation": 2}
            # withdrawn, but a request is in flight there: nothing is taken apart yet
            assert router.dismantler.pending == 1 and routes and served() is not None
            flag.write_text("go")
        assert answers[0].status_code == 200 and answers[0].json() == {"generation": 1}
        while router.dismantler.pending:
            await anyio.sleep(0.01)
        assert not routes and served() is None


def test_freed_generations_call_for_no_collection_of_their_own() -> None:
    c = Collector()
    c.note_unloaded()
    assert c._due() == "unloaded generations"
    c.note_freed()
    assert c.unloaded_since_full == 0 and c.freed_since_full == 1
    assert c._due() != "unloaded generations"
    # their remains (module dicts, functions, classes) are collected every MAX_FREED
    from kernel.collector import MAX_FREED

    for _ in range(MAX_FREED - 1):
        c.note_unloaded()
        c.note_freed()
    assert c._due() == "remains of freed generations"
    c.note_freed()  # a late word about an unload a collection already covered: ignored
    assert c.unloaded_since_full == 0


LIFESPAN = """
    from contextlib import asynccontextmanager
    from fastapi import APIRouter, Request

    @asynccontextmanager
    async def lifespan(app):
        yield {"greeting": "hi"}

    router = APIRouter(lifespan=lifespan)

    @router.get("/hello")
    async def hello(request: Request):
        return {"greeting": request.state.greeting}
    """


async def test_a_router_with_lifespan_state_is_freed_too(
    harness_factory: Any, plugins: Path
) -> None:
    """The mount of a router whose lifespan yields state is wrapped (``with_state``);
    it is still the mounter's own app, taken apart once withdrawn."""
    write_plugin(plugins, "life", router=LIFESPAN)
    h = await harness_factory()
    router: Any = h.kernel.services["router"]
    with anyio.fail_after(60):
        assert (await h.client.get("/app/life/hello")).json() == {"greeting": "hi"}
        gen = h.loader.loaded["life"]
        served = weakref.ref(router._mounts[("life", gen.generation)].app.router.routes[-1])
        del gen
        freed = router.dismantler.freed
        r = await h.client.post("/admin/plugins/life/reload", headers=AUTH)
        assert r.status_code == 200, r.text
        while router.dismantler.freed == freed:
            await anyio.sleep(0.01)
        assert served() is None
        assert (await h.client.get("/app/life/hello")).json() == {"greeting": "hi"}


async def test_a_generation_serving_a_request_is_no_leak_and_calls_for_no_collection(
    harness_factory: Any, plugins: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request in flight across a reload (a stream, a long poll) keeps the withdrawn
    generation alive: a full collection meanwhile could not free it, so its unload calls
    for none, and one that runs anyway does not make it a leak ("its memory is never
    freed") in /health; it is listed as draining instead, then freed by refcounting."""
    write_plugin(plugins, "web", router=SLOW.replace("{generation}", "1"))
    h = await harness_factory()
    router: Any = h.kernel.services["router"]
    flag = tmp_path / "flag"
    with anyio.fail_after(60):
        await leftovers_collected()
        monkeypatch.setattr(collector, "tick", 3600.0)  # its task is ours to drive
        await anyio.sleep(0.2)
        answers: list[Any] = []

        async def slow() -> None:
            answers.append(await h.client.get("/app/web/slow", params={"flag": str(flag)}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(slow)
            while not (tmp_path / "flag.in").exists():  # inside generation 1
                await anyio.sleep(0.01)
            write_plugin(plugins, "web", router=SLOW.replace("{generation}", "2"))
            r = await h.client.post("/admin/plugins/web/reload", headers=AUTH)
            assert r.status_code == 200, r.text
            while router.dismantler.pending == 0:  # withdrawn, serving the request
                await anyio.sleep(0.01)
            assert collector._due() != "unloaded generations"
            gc.collect()  # a full collection anyway, while the request runs
            _, health = await h.loader.health()
            assert "leaked_generations" not in health
            assert list(health["draining_generations"]) == ["web"]
            assert list(health["draining_generations"]["web"]) == ["1"]
            flag.write_text("go")
        assert answers[0].status_code == 200 and answers[0].json() == {"generation": 1}
        while router.dismantler.pending:
            await anyio.sleep(0.01)
        assert router.dismantler.freed >= 1
        # its remains wait for the collector's next collection; until then no leak
        _, health = await h.loader.health()
        assert "leaked_generations" not in health and "draining_generations" not in health
        assert collector.freed_since_full == 1  # the remains' rule will collect them
        gc.collect()
        assert h.loader.leaked_generations() == {}


DEPS = """
    import asyncio
    from pathlib import Path
    from fastapi import APIRouter, Depends
    router = APIRouter()

    async def slow_auth(flag: str):
        Path(flag + ".in").write_text("")
        while not Path(flag).exists():
            await asyncio.sleep(0.01)
        return "user"

    def session(user: str = Depends(slow_auth)):
        yield {"user": user}

    @router.get("/me")
    async def me(s: dict = Depends(session)):
        return {"generation": {generation}, **s}
    """


async def test_a_request_in_flight_leaves_no_reference_in_fastapis_caches(
    harness_factory: Any, plugins: Path, tmp_path: Path
) -> None:
    """A request on the withdrawn generation resolves dependencies after the reload
    (FastAPI classifies each dependency on each request, in module-level LRU caches
    that hold the callable): those caches are pruned again once its last request has
    ended, so the generation is still freed (not kept by FastAPI until 4,096 other
    callables evict it, reported as a leak meanwhile)."""
    write_plugin(plugins, "web", router=DEPS.replace("{generation}", "1"))
    h = await harness_factory()
    router: Any = h.kernel.services["router"]
    flag = tmp_path / "flag"
    with anyio.fail_after(60):
        answers: list[Any] = []

        async def slow() -> None:
            answers.append(await h.client.get("/app/web/me", params={"flag": str(flag)}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(slow)
            while not (tmp_path / "flag.in").exists():  # in its first dependency
                await anyio.sleep(0.01)
            write_plugin(plugins, "web", router=DEPS.replace("{generation}", "2"))
            r = await h.client.post("/admin/plugins/web/reload", headers=AUTH)
            assert r.status_code == 200, r.text
            flag.write_text("go")
        assert answers[0].json() == {"generation": 1, "user": "user"}
        while router.dismantler.pending:
            await anyio.sleep(0.01)
        gc.collect()
        assert h.loader.leaked_generations() == {}
        flag.write_text("go")
        r = await h.client.get("/app/web/me", params={"flag": str(flag)})
        assert r.json() == {"generation": 2, "user": "user"}


async def test_a_full_collection_while_a_generation_is_taken_apart_makes_no_leak(
    harness_factory: Any, plugins: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A big generation is taken apart over many slices of the loop; a full collection
    that runs meanwhile (another plugin's unload, the interpreter's own rule) finds it
    still alive, rightly: that does not make it a leak once it is freed."""
    from services.router import dismantle

    monkeypatch.setattr(dismantle, "SLICE_S", 0.0)  # one batch of routes per loop pass
    write_plugin(plugins, "posts", router=posts_router(200))
    h = await harness_factory()
    router: Any = h.kernel.services["router"]
    with anyio.fail_after(60):
        freed = router.dismantler.freed
        caught: list[int] = []

        async def collect_while_taken_apart() -> None:
            while router.dismantler.pending == 0:  # (checked at every pass of the loop)
                await anyio.lowlevel.checkpoint()
            caught.append(len(router._mounts))  # being taken apart, a batch a pass
            gc.collect()

        async with anyio.create_task_group() as tg:
            tg.start_soon(collect_while_taken_apart)
            r = await h.client.post("/admin/plugins/posts/reload", headers=AUTH)
            assert r.status_code == 200, r.text
        assert caught
        while router.dismantler.pending:
            await anyio.sleep(0.01)
        assert router.dismantler.freed == freed + 1
        assert h.loader.leaked_generations() == {}
        gc.collect()
        assert h.loader.leaked_generations() == {}
