"""FastAPI's per-field validators of a plugin are built at the end of its import, paced
(services/loader/lazy.py): a generation is mounted with every validator built, answers
exactly as with FastAPI's own eager build (``lazy_validators: false``), an unsupported type
is refused at load (boot and reload, the old generation serving on), and routes declared
outside a plugin build (the host app's) are built by FastAPI as always."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest
from fastapi import APIRouter, Query
from pydantic import TypeAdapter

from kernel import pacing
from services.loader import lazy
from services.loader.events import PluginReloadRequested
from services.loader.lazy import LazyTypeAdapter

from .conftest import AUTH, write_plugin

ROUTER = """
    from fastapi import APIRouter, Query
    from pydantic import BaseModel

    router = APIRouter()

    class Item(BaseModel):
        id: int
        name: str
        tags: list[str] = []

    @router.post("/items/{item_id}", response_model=Item)
    async def put(item_id: int, item: Item, q: str | None = Query(None, max_length=3)) -> Item:
        return item

    @router.get("/echo")
    async def echo(n: int = Query(..., gt=0)) -> dict[str, int]:
        return {"n": n}
    """

REQUESTS: list[tuple[str, str, dict[str, Any]]] = [
    ("POST", "/app/shop/items/1", {"json": {"id": 1, "name": "a", "extra": 1}}),
    ("POST", "/app/shop/items/x", {"json": {"id": "no"}}),
    ("POST", "/app/shop/items/1?q=long", {"json": {"id": 1, "name": "a"}}),
    ("GET", "/app/shop/echo?n=3", {}),
    ("GET", "/app/shop/echo?n=0", {}),
    ("GET", "/app/shop/echo", {}),
]


def adapters(h: Any) -> list[Any]:
    router = h.loader.loaded["shop"].imported.router
    out = []
    for route in router.routes:
        fields = [*route.dependant.query_params, *route.dependant.path_params]
        fields += [*route.dependant.body_params]
        if route.response_field is not None:
            fields.append(route.response_field)
        out += [f._type_adapter for f in fields]
    return out


async def answers(h: Any) -> list[tuple[int, Any]]:
    out = []
    for method, url, kw in REQUESTS:
        r = await h.client.request(method, url, **kw)
        out.append((r.status_code, r.json()))
    return out


def built(adapter: Any) -> bool:
    return type(adapter) is TypeAdapter or (
        type(adapter) is LazyTypeAdapter and adapter._real is not None
    )


async def test_every_validator_is_built_before_the_swap_and_answers_the_same(
    harness_factory: Any, plugins: Path
) -> None:
    write_plugin(
        plugins, "shop", info={"version": "1.0.0", "api_prefix": "/app/shop"}, router=ROUTER
    )
    eager = await harness_factory(loader={"lazy_validators": False})
    assert not lazy.installed()
    assert all(type(a) is TypeAdapter for a in adapters(eager))
    expected = await answers(eager)
    expected_openapi = (await eager.client.get("/openapi.json")).json()
    await eager.stop()

    h = await harness_factory()
    assert lazy.installed()
    for generation in (1, 2):
        made = adapters(h)
        # deferred while the routes were declared, all built before the generation served
        assert made and all(type(a) is LazyTypeAdapter for a in made)
        assert all(a._real is not None for a in made), made
        if generation == 1:
            r = await h.client.post("/admin/plugins/shop/reload", headers=AUTH)
            assert r.status_code == 200, r.text
    before = lazy.built
    assert await answers(h) == expected
    assert (await h.client.get("/openapi.json")).json() == expected_openapi
    assert lazy.built == before  # no request built one
    await h.stop()
    assert not lazy.installed()  # FastAPI's own is back when the loader stops


async def test_routes_declared_outside_a_plugin_build_are_built_at_once(
    harness_factory: Any, plugins: Path
) -> None:
    """The host application's own routes are FastAPI's, untouched, while the loader runs."""
    h = await harness_factory()
    assert lazy.installed()

    def declare() -> APIRouter:
        router = APIRouter()

        @router.get("/host")
        async def host(n: int = Query(..., gt=0)) -> dict[str, int]:
            return {"n": n}

        return router

    for router in (declare(), await asyncio.to_thread(declare)):
        route = router.routes[0]
        fields = [*route.dependant.query_params, route.response_field]  # type: ignore[attr-defined]
        assert all(type(f._type_adapter) is TypeAdapter for f in fields), fields
    await h.stop()


BAD = """
    from fastapi import APIRouter, Body

    router = APIRouter()

    class Opaque:  # not a type pydantic can build a schema for
        pass

    @router.get("/fine")
    async def fine() -> dict[str, str]:
        return {"v": "2"}

    @router.post("/bad")
    async def bad(thing: Opaque = Body(...)) -> dict[str, str]:
        return {}
    """


def assert_names_the_culprit(error: dict[str, Any] | Any) -> None:
    text = error["error"]
    assert error["stage"] == "import", error
    assert "plugin 'odd'" in text and "POST /app/odd/bad" in text, text
    assert "field 'thing' (body)" in text and "Opaque" in text, text
    assert "PydanticSchemaGenerationError" in text, text
    assert error["file"] == "router.py" and error["line"] == 13, error


@pytest.mark.parametrize("lazy_validators", [True, False])
async def test_an_unsupported_type_is_refused_at_boot(
    harness_factory: Any, plugins: Path, lazy_validators: bool
) -> None:
    write_plugin(plugins, "odd", info={"version": "1.0.0", "api_prefix": "/app/odd"}, router=BAD)
    h = await harness_factory(loader={"lazy_validators": lazy_validators})
    row = (await h.client.get("/admin/plugins/odd", headers=AUTH)).json()
    assert row["status"] == "failed", row
    assert "Opaque" in row["last_error"]["error"], row
    if lazy_validators:  # eagerly, the import's own traceback names router.py
        [failed] = await h.events("PluginLoadFailed", name="odd")
        assert_names_the_culprit(failed.data)
    assert (await h.client.get("/app/odd/fine")).status_code == 404


SUB = """
    from fastapi import APIRouter, Body, Depends

    router = APIRouter()
    sub = APIRouter(prefix="/sub")

    class Opaque:
        pass

    def dep(thing: Opaque = Body(...)) -> int:
        return 1

    @sub.post("/bad")
    async def bad(x: int = Depends(dep)) -> dict[str, str]:
        return {}

    router.include_router(sub)
    """


async def test_an_unsupported_type_in_a_dependency_of_an_included_router_is_refused(
    harness_factory: Any, plugins: Path
) -> None:
    write_plugin(plugins, "odd", info={"version": "1.0.0", "api_prefix": "/app/odd"}, router=SUB)
    h = await harness_factory()
    [failed] = await h.events("PluginLoadFailed", name="odd")
    text = failed.data["error"]
    assert "POST /app/odd/sub/bad: field 'thing' (body)" in text and "Opaque" in text, text
    assert (failed.data["stage"], failed.data["file"]) == ("import", "router.py")


async def test_an_unsupported_type_is_refused_on_reload_and_the_old_generation_serves(
    harness_factory: Any, plugins: Path
) -> None:
    folder = write_plugin(
        plugins,
        "odd",
        info={"version": "1.0.0", "api_prefix": "/app/odd"},
        router=BAD.replace('{"v": "2"}', '{"v": "1"}').split("@router.post")[0],
    )
    h = await harness_factory()
    assert (await h.client.get("/app/odd/fine")).json() == {"v": "1"}
    (folder / "router.py").write_text(textwrap.dedent(BAD))
    r = await h.client.post("/admin/plugins/odd/reload", headers=AUTH)
    assert r.status_code == 422, r.text
    assert r.json()["serving_generation"] == 1
    [failed] = await h.events("PluginReloadFailed", name="odd")
    assert_names_the_culprit(failed.data)
    # nothing changed: generation 1 answers, the bad route does not exist
    assert (await h.client.get("/app/odd/fine")).json() == {"v": "1"}
    assert (await h.client.post("/app/odd/bad", json={})).status_code == 404
    assert h.table.rows["odd"]["generation"] == 1


ROUTES = 100


def many_routes(count: int) -> str:
    lines = [
        "from fastapi import APIRouter, Query",
        "from pydantic import BaseModel",
        "router = APIRouter()",
    ]
    for i in range(count):
        lines += [
            f"class M{i}(BaseModel):",
            "    a: int",
            "    b: list[str] = []",
            f"@router.post('/r{i}', response_model=M{i})",
            f"async def r{i}(body: M{i}, q: int = Query(0, ge=0)) -> M{i}:",
            "    return body",
        ]
    return "\n".join(lines) + "\n"


async def test_paused_time_does_not_count_against_the_import_timeout(
    harness_factory: Any, plugins: Path
) -> None:
    """A tiny CPU share makes a many-route import pause far longer than import_timeout."""
    timeout = 1.0
    folder = write_plugin(
        plugins,
        "many",
        info={"version": "1.0.0", "api_prefix": "/app/many"},
        router=many_routes(1),
    )
    h = await harness_factory(loader={"build_cpu_share": 0.05, "import_timeout": timeout})
    (folder / "router.py").write_text(many_routes(ROUTES))
    slept = pacing.slept
    await h.kernel.append(PluginReloadRequested(name="many"), stream="plugin-many")
    with anyio.fail_after(120):
        while not (done := await h.events("PluginReloaded", "PluginReloadFailed", name="many")):
            await anyio.sleep(0.05)
    assert done[0].type == "PluginReloaded", done[0].data
    # the build paused far longer than the import's timeout (19 s asleep per CPU second)
    print(f"paused {pacing.slept - slept:.2f}s")
    assert pacing.slept - slept > 2 * timeout
    assert (await h.client.post(f"/app/many/r{ROUTES - 1}", json={"a": 1})).json() == {
        "a": 1,
        "b": [],
    }
    assert all(built(a) for a in many_adapters(h))


def many_adapters(h: Any) -> list[Any]:
    router = h.loader.loaded["many"].imported.router
    out = []
    for route in router.routes:
        out += [f._type_adapter for f in route.dependant.query_params]
        out += [f._type_adapter for f in route.dependant.body_params]
    return out


async def test_a_timeout_error_raised_by_the_import_is_its_own_failure(
    harness_factory: Any, plugins: Path
) -> None:
    """The import's own TimeoutError is reported as raised, not as the loader's timeout."""
    write_plugin(
        plugins,
        "late",
        info={"version": "1.0.0", "api_prefix": "/app/late"},
        router="raise TimeoutError('upstream did not answer')\n",
    )
    h = await harness_factory(loader={"import_timeout": 5})
    [failed] = await h.events("PluginLoadFailed", name="late")
    assert "TimeoutError: upstream did not answer" in failed.data["error"], failed.data
    assert h.loader.threads.stuck_of("late") == []
