"""FastAPI's lazily built route state is built ahead of the first request (kernel/warm.py)."""

from __future__ import annotations

import httpx
from fastapi import APIRouter, FastAPI
from pydantic import BaseModel

from kernel.warm import warm_routes


class Item(BaseModel):
    id: int


def app_with_nested_routers() -> FastAPI:
    inner = APIRouter()

    @inner.post("/items/{item_id}", response_model=Item)
    async def item(item_id: int, body: Item) -> Item:
        return body

    outer = APIRouter()
    outer.include_router(inner, prefix="/inner")

    @outer.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    app = FastAPI()
    app.include_router(outer, prefix="/outer")
    return app


async def first_requests(app: FastAPI) -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/outer/ping")).json() == {"ok": True}
        r = await client.post("/outer/inner/items/1", json={"id": 1})
        assert r.json() == {"id": 1}


async def test_the_first_request_builds_nothing_once_warmed(built: list[str]) -> None:
    cold = app_with_nested_routers()
    await first_requests(cold)
    assert built, "FastAPI built nothing at the first request: the test no longer tests"
    built.clear()
    warm = app_with_nested_routers()
    assert warm_routes(warm.router) == 2  # the outer include and the inner one
    assert sorted(built) == ["/items/{item_id}", "/ping"]
    built.clear()
    await first_requests(warm)
    assert built == []


def test_an_app_without_includes_is_left_alone() -> None:
    app = FastAPI()

    @app.get("/x")
    async def x() -> int:
        return 1

    assert warm_routes(app.router) == 0
    assert warm_routes(object()) == 0
