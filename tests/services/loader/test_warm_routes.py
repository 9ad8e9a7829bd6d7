"""No request pays for FastAPI's lazily built route state: not the first admin request
after the boot (kernel/warm.py), not the first request of a plugin router that FastAPI
includes itself (a sub-router: services/router/mounts.py route_paths)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import AUTH, write_plugin

routing: Any = pytest.importorskip("fastapi.routing")


@pytest.fixture
def built() -> Iterator[list[str]]:
    context = getattr(routing, "_EffectiveRouteContext", None)
    if context is None or not hasattr(context, "from_api_route"):
        pytest.skip("this FastAPI builds included routes at include time")
    original = context.from_api_route.__func__
    seen: list[str] = []

    def counted(cls: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("original_route", args[0] if args else None).path)
        return original(cls, *args, **kwargs)

    context.from_api_route = classmethod(counted)
    try:
        yield seen
    finally:
        context.from_api_route = classmethod(original)


SUB_ROUTER = """
from fastapi import APIRouter
from pydantic import BaseModel

class Item(BaseModel):
    id: int

inner = APIRouter()

@inner.post("/items/{item_id}", response_model=Item)
async def item(item_id: int, body: Item) -> Item:
    return body

router = APIRouter()
router.include_router(inner, prefix="/inner")
"""


async def test_first_admin_and_plugin_requests_build_no_route_state(
    harness_factory: Any, plugins: Path, built: list[str]
) -> None:
    write_plugin(plugins, "nested", router=SUB_ROUTER)
    h = await harness_factory()
    assert built, "nothing was built ahead: the test no longer tests"
    built.clear()
    r = await h.client.get("/admin/plugins", headers=AUTH)
    assert r.status_code == 200, r.text
    r = await h.client.post("/app/nested/inner/items/3", json={"id": 3})
    assert r.json() == {"id": 3}
    assert built == []
