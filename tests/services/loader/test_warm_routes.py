"""No request pays for FastAPI's lazily built route state: not the first admin request
after the boot (kernel/warm.py), not the first request of a plugin router that FastAPI
includes itself (a sub-router: services/router/mounts.py route_paths)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .conftest import AUTH, write_plugin

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
