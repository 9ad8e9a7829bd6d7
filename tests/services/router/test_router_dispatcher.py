"""The dispatcher: its prefix table, its fallback path, and its front route."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import APIRouter

from kernel import Kernel
from services.router.dispatcher import Dispatcher, Mount, Table
from services.router.events import RouteConflict
from services.router.service import RouterService
from services.router.stats import RouteStats


async def _noop(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("not called")


def _mount(plugin: str, prefix: str) -> Mount:
    return Mount(
        plugin=plugin,
        generation=1,
        prefix=prefix,
        paths=[],
        app=_noop,
        stats=RouteStats().plugin(plugin),
        entry=_noop,
    )


def test_longest_prefix_wins_on_segment_boundaries() -> None:
    table = Table([_mount("outer", "/app"), _mount("inner", "/app/inner")])
    assert table.lengths == (10, 4)
    match = table.match
    assert match("/app/inner/x").plugin == "inner"  # type: ignore[union-attr]
    assert match("/app/inner").plugin == "inner"  # type: ignore[union-attr]
    assert match("/app/innerx").plugin == "outer"  # type: ignore[union-attr]
    assert match("/app").plugin == "outer"  # type: ignore[union-attr]
    assert match("/apps") is None
    assert match("/") is None


def test_a_table_refuses_two_mounts_of_one_prefix_or_plugin() -> None:
    with pytest.raises(ValueError, match="prefix '/a' is mounted twice"):
        Table([_mount("a", "/a"), _mount("b", "/a")])
    with pytest.raises(ValueError, match="plugin 'a' is mounted twice"):
        Table([_mount("a", "/a"), _mount("a", "/b")])


def test_replace_builds_a_new_table() -> None:
    first = Table([_mount("a", "/a")])
    second = first.replace("b", _mount("b", "/b"))
    assert set(first.by_plugin) == {"a"}
    assert set(second.by_plugin) == {"a", "b"}
    assert set(second.replace("a", None).by_plugin) == {"b"}


async def test_the_fallback_only_answers_json_404s(harness: Any, status_router: Any) -> None:
    # plugin requests are served by the front route; the fallback gets what it missed
    await harness.load("hello", 1, status_router("", "h"), "/app/hello")
    dispatcher: Dispatcher = harness.router.dispatcher
    transport = httpx.ASGITransport(app=dispatcher)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for path in ("/elsewhere", "/app/hello/status"):
            missing = await client.get(path)
            assert missing.status_code == 404, path
            assert missing.json() == {"detail": "Not Found"}
            assert missing.headers["content-type"] == "application/json"
    assert harness.router.stats.unmatched == 2
    assert harness.router.stats.plugin("hello").requests == 0
    # through the host app the same plugin path is served by the front route
    assert (await harness.client.get("/app/hello/status")).json() == {"plugin": "h"}
    assert harness.router.stats.plugin("hello").requests == 1
    assert harness.router.stats.unmatched == 2


async def test_method_not_allowed_is_counted_as_4xx(harness: Any, status_router: Any) -> None:
    await harness.load("hello", 1, status_router("", "h"), "/app/hello")
    assert (await harness.client.delete("/app/hello/status")).status_code == 405
    stats = harness.router.stats.plugin("hello")
    assert stats.by_class[4] == 1
    assert stats.errors == 0


async def test_the_host_app_resolves_plugin_route_names(harness: Any) -> None:
    router = APIRouter()

    @router.get("/items/{item_id}", name="hello_item")
    async def item(item_id: int) -> int:
        return item_id

    await harness.load("hello", 1, router, "/app/hello")
    assert harness.app.url_path_for("hello_item", item_id=5) == "/app/hello/items/5"


async def test_kernel_routes_are_never_shadowed(harness: Any, status_router: Any) -> None:
    # the front route comes first, but reserved prefixes can never be mounted
    outcome = await harness.load("health", 1, status_router("", "x"), "/health")
    assert outcome.type == RouteConflict.type_name
    assert (await harness.client.get("/health/live")).json() == {"status": "ok"}


class PagesService:
    """A service with public routes outside the reserved list."""

    name = "pages"

    async def start(self, kernel: Kernel, stack: Any) -> None:
        router = APIRouter()

        @router.get("/pages/about")
        async def about() -> str:
            return "about"

        kernel.http.add_router(router)


async def test_paths_served_by_services_cannot_be_claimed(
    tmp_path: Path, status_router: Any, make_harness: Any
) -> None:
    async with make_harness(tmp_path, [RouterService(), PagesService()]) as harness:
        outcome = await harness.load("pages", 1, status_router("", "x"), "/pages")
        assert outcome.type == RouteConflict.type_name
        assert outcome.data["conflicts_with"] == "kernel"
        assert outcome.data["paths"] == ["/pages/about"]
        assert (await harness.client.get("/pages/about")).json() == "about"
