"""A router written for a bare FastAPI app works unchanged: its lifespan, its startup and
shutdown handlers run with the generation; dependency overrides have a per-plugin way in."""

from __future__ import annotations

from pathlib import Path

from .conftest import AUTH, write_plugin

LIFESPAN_ROUTER = """
    from contextlib import asynccontextmanager
    from pathlib import Path
    from fastapi import APIRouter, Depends, Request

    LOG = Path(__file__).parent.parent / "lifespan.log"

    def note(what):
        with LOG.open("a") as f:
            f.write(what + "\\n")

    @asynccontextmanager
    async def lifespan(app):
        note("lifespan start")
        yield {"pool": "ready"}
        note("lifespan stop")

    def get_user():
        return "real"

    router = APIRouter(lifespan=lifespan, on_startup=[lambda: note("startup")],
                       on_shutdown=[lambda: note("shutdown")])

    @router.get("/state")
    async def state(request: Request, user: str = Depends(get_user)):
        return {"pool": request.state.pool, "user": user}
    """


def lines(plugins: Path) -> list[str]:
    path = plugins / "lifespan.log"
    return path.read_text().splitlines() if path.exists() else []


async def test_router_lifespan_runs_with_the_generation(harness_factory, plugins: Path) -> None:
    write_plugin(plugins, "life", router=LIFESPAN_ROUTER)
    h = await harness_factory()
    start, stop = {"lifespan start", "startup"}, {"lifespan stop", "shutdown"}
    assert set(lines(plugins)) == start  # (in the order FastAPI runs them for a bare app)
    assert (await h.client.get("/app/life/state")).json() == {"pool": "ready", "user": "real"}
    r = await h.client.post("/admin/plugins/life/reload", headers=AUTH)
    assert r.status_code == 200
    # the new generation started before it was mounted, the old one stopped after
    seen = lines(plugins)
    assert set(seen[2:4]) == start and set(seen[4:6]) == stop and len(seen) == 6
    await h.stop()
    assert set(lines(plugins)[-2:]) == stop and len(lines(plugins)) == 8


async def test_a_failing_router_lifespan_fails_the_load(harness_factory, plugins: Path) -> None:
    write_plugin(
        plugins,
        "nolife",
        router="""
            from contextlib import asynccontextmanager
            from fastapi import APIRouter

            @asynccontextmanager
            async def lifespan(app):
                raise RuntimeError("database unreachable")
                yield

            router = APIRouter(lifespan=lifespan)

            @router.get("/x")
            async def x():
                return 1
            """,
    )
    h = await harness_factory()
    [failed] = await h.events("PluginLoadFailed", name="nolife")
    assert failed.data["stage"] == "mount" and "database unreachable" in failed.data["error"]
    assert "router.py" in failed.data["error"]
    assert (await h.client.get("/app/nolife/x")).status_code == 404


async def test_dependency_overrides_per_plugin(harness_factory, plugins: Path) -> None:
    write_plugin(plugins, "life", router=LIFESPAN_ROUTER)
    h = await harness_factory()
    router_service = h.kernel.services["router"]
    get_user = h.loader.loaded["life"].imported.router.routes[0].dependant.dependencies[0].call
    router_service.dependency_overrides("life")[get_user] = lambda: "fake"
    assert (await h.client.get("/app/life/state")).json()["user"] == "fake"
    router_service.dependency_overrides("life").clear()
    assert (await h.client.get("/app/life/state")).json()["user"] == "real"


async def test_a_router_prefix_collision_names_router_py(harness_factory, plugins: Path) -> None:
    write_plugin(
        plugins,
        "first",
        info={"version": "1.0.0", "api_prefix": "/shared"},
        router="from fastapi import APIRouter\nrouter = APIRouter()\n@router.get('/a')\ndef a(): return 1\n",
    )
    write_plugin(
        plugins,
        "second",
        info={"version": "1.0.0"},
        router=(
            "from fastapi import APIRouter\nrouter = APIRouter(prefix='/shared/b')\n"
            "@router.get('/x')\ndef x(): return 1\n"
        ),
    )
    h = await harness_factory()
    [failed] = await h.events("PluginLoadFailed", name="second")
    assert failed.data["file"] == "router.py"
    assert "router.py: APIRouter(prefix='/shared/b')" in failed.data["error"]
    assert "run.py" not in failed.data["error"]


async def test_a_rolled_back_reload_serves_the_old_mount_again_with_its_one_lifespan(
    harness_factory, plugins: Path
) -> None:
    """``life`` reloads with ``dep`` that requires it; ``dep``'s new router fails its
    lifespan, so ``life``'s new generation is rolled back after it was mounted: the old
    generation's mount — never withdrawn, its lifespan still running — serves again. It
    is not built a second time with a second lifespan that no unload ever stops."""
    write_plugin(plugins, "life", router=LIFESPAN_ROUTER)
    write_plugin(
        plugins,
        "dep",
        info={"version": "1.0.0", "api_prefix": "/app/dep", "requires": {"life": ">=1"}},
        router="from fastapi import APIRouter\nrouter = APIRouter()\n"
        "@router.get('/x')\ndef x(): return 1\n",
    )
    h = await harness_factory()
    router_service = h.kernel.services["router"]
    assert (await h.client.get("/app/life/state")).json() == {"pool": "ready", "user": "real"}
    served = router_service.dispatcher.table.by_plugin["life"]
    write_plugin(
        plugins,
        "dep",
        info={"version": "1.0.0", "api_prefix": "/app/dep", "requires": {"life": ">=1"}},
        router="""
            from contextlib import asynccontextmanager
            from fastapi import APIRouter

            @asynccontextmanager
            async def lifespan(app):
                raise RuntimeError("database unreachable")
                yield

            router = APIRouter(lifespan=lifespan)

            @router.get("/x")
            async def x():
                return 1
            """,
    )
    r = await h.client.post("/admin/plugins/life/reload", headers=AUTH)
    assert r.status_code != 200 and "database unreachable" in r.text
    assert h.loader.loaded["life"].generation == served.generation
    assert router_service.dispatcher.table.by_plugin["life"] is served
    assert (await h.client.get("/app/life/state")).json() == {"pool": "ready", "user": "real"}
    await h.stop()
    seen = lines(plugins)
    starts = sum(1 for line in seen if line in ("lifespan start", "startup"))
    stops = sum(1 for line in seen if line in ("lifespan stop", "shutdown"))
    assert starts == stops == 4  # generation 1 and the rolled-back one, each once
