"""A plugin router's routes copied at their public paths serve exactly as FastAPI's include.

The mounter gives a router of plain ``APIRoute`` objects to its app by copying the
routes at the prefix (``services/router/prefixed.py``) instead of letting FastAPI build
each route a second time. The copies must be indistinguishable: the same OpenAPI
document, the same answers (validation errors, 404/405, redirects, ``url_for``), the
plugin's own route in ``scope["route"]``, the app's dependency overrides; and nothing
may be built again (the copies share the originals' dependants and validators).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request, WebSocket
from fastapi.responses import PlainTextResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel

from services.router.prefixed import PrefixedRoute, include_prefixed, prefixable

pytestmark = pytest.mark.anyio

ROOT = "/app/p"


class Item(BaseModel):
    id: int
    name: str = "x"


class Missing(BaseModel):
    detail: str


def token(x_token: Annotated[str | None, Header()] = None) -> str | None:
    return x_token


def make_router(**router_kw: Any) -> APIRouter:
    """A fresh router (each app gets its own, as each plugin generation does)."""
    router = APIRouter(tags=["p"], responses={418: {"description": "teapot"}}, **router_kw)

    @router.get(
        "/items/{item_id}",
        response_model=list[Item],
        responses={404: {"model": Missing}},
        deprecated=True,
    )
    async def items(
        item_id: int,
        q: Annotated[str | None, Query(max_length=5)] = None,
        t: str | None = Depends(token),
    ) -> list[Item]:
        if item_id == 0:
            raise HTTPException(404, "no such item")
        return [Item(id=item_id, name=q or t or "n")]

    @router.post("/items", status_code=201, operation_id="make_it", summary="Make one")
    def make(item: Item) -> Item:
        return item

    @router.put("/items/{item_id}")
    def put(item_id: int, item: Item, request: Request) -> dict[str, Any]:
        route = request.scope["route"]
        return {
            "url": str(request.url_for("items", item_id=item_id)),
            "route": route.path,
            "own": route in router.routes,
        }

    @router.get("/plain")
    def plain() -> dict[str, int]:
        return {"a": 1}

    return router


def custom_id(route: APIRoute) -> str:
    return f"custom-{route.name}-{route.path_format}"


def make_other_router() -> APIRouter:
    """Router-level prefix, dependencies and unique ids; streams, callbacks, plain text."""
    callbacks = APIRouter()

    @callbacks.post("{$callback_url}/events")
    def event(body: Item) -> None:
        return None

    router = APIRouter(
        prefix="/v1", generate_unique_id_function=custom_id, dependencies=[Depends(token)]
    )

    @router.get("/stream")
    async def stream() -> AsyncIterator[Item]:
        for i in range(3):
            yield Item(id=i)

    @router.get("/text", response_class=PlainTextResponse)
    def text() -> str:
        return "hi"

    @router.post("/hook", callbacks=callbacks.routes)
    def hook(item: Item) -> Item:
        return item

    @router.get("/hidden", include_in_schema=False)
    def hidden() -> dict[str, bool]:
        return {"hidden": True}

    return router


def apps(make: Callable[[], APIRouter] = make_router) -> tuple[FastAPI, FastAPI, APIRouter]:
    theirs = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    theirs.include_router(make(), prefix=ROOT)
    ours = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    router = make()
    assert include_prefixed(ours, router, ROOT)
    return ours, theirs, router


REQUESTS: list[tuple[str, str, dict[str, Any]]] = [
    ("GET", "/items/3?q=ab", {}),
    ("GET", "/items/3", {"headers": {"x-token": "tok"}}),
    ("GET", "/items/0", {}),
    ("GET", "/items/x", {}),
    ("GET", "/items/3?q=abcdefg", {}),
    ("POST", "/items", {"json": {"id": 1}}),
    ("POST", "/items", {"json": {"idx": 1}}),
    ("POST", "/items", {"content": b"{not json", "headers": {"content-type": "application/json"}}),
    ("PUT", "/items/4", {"json": {"id": 2}}),
    ("DELETE", "/items/4", {}),
    ("GET", "/plain", {}),
    ("GET", "/plain/", {}),
    ("GET", "/nope", {}),
    ("GET", "/v1/stream", {}),
    ("GET", "/v1/text", {}),
    ("POST", "/v1/hook", {"json": {"id": 5}}),
    ("GET", "/v1/hidden", {}),
]


@pytest.mark.parametrize("make", [make_router, make_other_router])
async def test_copied_routes_answer_and_document_as_fastapis_include(
    make: Callable[[], APIRouter],
) -> None:
    ours, theirs, _ = apps(make)
    assert json.dumps(ours.openapi(), sort_keys=True) == json.dumps(
        theirs.openapi(), sort_keys=True
    )
    with anyio.fail_after(30):
        async with (
            httpx.AsyncClient(transport=httpx.ASGITransport(app=ours), base_url="http://t") as a,
            httpx.AsyncClient(transport=httpx.ASGITransport(app=theirs), base_url="http://t") as b,
        ):
            for method, path, kw in REQUESTS:
                ra = await a.request(method, ROOT + path, **kw)
                rb = await b.request(method, ROOT + path, **kw)
                assert (ra.status_code, ra.headers.get("allow"), ra.headers.get("location")) == (
                    rb.status_code,
                    rb.headers.get("allow"),
                    rb.headers.get("location"),
                ), (method, path)
                assert ra.text == rb.text, (method, path)
            if make is make_router:
                put = (await a.put(ROOT + "/items/4", json={"id": 2})).json()
                # the plugin's own route, at its own path, as a bare app's code sees it
                assert put == {
                    "url": "http://t/app/p/items/4",
                    "route": "/items/{item_id}",
                    "own": True,
                }


async def test_nothing_is_built_again() -> None:
    ours, _, router = apps()
    copies = [r for r in ours.router.routes if isinstance(r, PrefixedRoute)]
    assert len(copies) == len(router.routes) == 4
    for copy, original in zip(copies, router.routes, strict=True):
        assert copy.original is original
        assert copy.path == ROOT + original.path
        assert copy.dependant is original.dependant
        if original.response_field is not None:
            assert copy.response_field is not None
            assert copy.response_field.name == "Response_" + copy.unique_id
            assert copy.response_field._type_adapter is original.response_field._type_adapter


async def test_the_apps_dependency_overrides_reach_the_copies() -> None:
    ours, _, _ = apps()
    ours.dependency_overrides[token] = lambda: "overridden"
    with anyio.fail_after(30):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=ours), base_url="http://t"
        ) as client:
            r = await client.get(ROOT + "/items/3")
    assert r.json() == [{"id": 3, "name": "overridden"}]


async def test_the_routers_lifespan_is_merged_into_the_app() -> None:
    seen: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        seen.append("start")
        yield {"ready": True}
        seen.append("stop")

    ours = FastAPI(openapi_url=None)
    assert include_prefixed(ours, make_router(lifespan=lifespan), ROOT)
    with anyio.fail_after(10):
        async with ours.router.lifespan_context(ours) as state:
            assert state == {"ready": True}
    assert seen == ["start", "stop"]


def test_routers_fastapi_must_include_are_left_to_it() -> None:
    with_ws = make_router()

    @with_ws.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.close()

    nested = make_router()
    nested.include_router(APIRouter(), prefix="/sub")

    class Own(APIRoute):
        pass

    custom = APIRouter(route_class=Own)

    @custom.get("/x")
    def x() -> None:
        return None

    embedded = APIRouter()

    @embedded.post("/two")
    def two(a: Item, b: Item) -> None:
        return None

    assert prefixable(make_router(), ROOT) is None
    for router in (with_ws, nested, custom, embedded):
        assert prefixable(router, ROOT) is not None
        app = FastAPI(openapi_url=None)
        assert not include_prefixed(app, router, ROOT)
        assert not any(isinstance(r, PrefixedRoute) for r in app.router.routes)
    assert prefixable(make_router(), "/app/{tenant}") is not None
