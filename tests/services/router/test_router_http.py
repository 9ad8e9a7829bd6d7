"""What HTTP clients see: 404s, /openapi.json and /docs following plugins, the stats table."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel

from kernel import NewEvent
from kernel.events import Meta
from services.router.events import RoutesMounted, stream_of


class Item(BaseModel):
    name: str


def item_router() -> APIRouter:
    router = APIRouter()

    @router.post("/items")
    async def create_item(item: Item) -> Item:
        return item

    return router


async def test_unknown_paths_get_a_json_404(harness: Any, status_router: Any) -> None:
    await harness.load("hello", 1, status_router("", "h"), "/app/hello")
    for path in ("/nowhere", "/app/hellox/status", "/app"):
        response = await harness.client.get(path)
        assert response.status_code == 404, path
        assert response.json() == {"detail": "Not Found"}
        assert response.headers["content-type"] == "application/json"
    # under /admin, authentication comes first: an anonymous client cannot map the paths
    response = await harness.client.get("/admin/nothing-here")
    assert response.status_code in (401, 503)
    assert response.headers["content-type"] == "application/json"


async def test_a_plugin_404_inside_its_prefix_is_its_own(harness: Any, status_router: Any) -> None:
    await harness.load("hello", 1, status_router("", "h"), "/app/hello")
    response = await harness.client.get("/app/hello/missing")
    assert response.status_code == 404
    assert harness.router.stats.plugin("hello").by_class[4] == 1
    assert harness.router.stats.unmatched == 0


async def test_openapi_follows_plugins_as_they_come_and_go(
    harness: Any, status_router: Any
) -> None:
    async def paths() -> dict[str, Any]:
        response = await harness.client.get("/openapi.json")
        assert response.status_code == 200
        return response.json()["paths"]

    assert "/app/hello/status" not in await paths()
    await harness.load("hello", 1, status_router("/hello", "h"), "/app/hello")
    assert "/app/hello/status" in await paths()
    await harness.unload("hello", 1)
    assert "/app/hello/status" not in await paths()
    # the kernel's own paths are still there
    assert "/health" in await paths()


async def test_openapi_namespaces_two_plugins_models(harness: Any) -> None:
    await harness.load("a", 1, item_router(), "/app/a")
    await harness.load("b", 1, item_router(), "/app/b")
    schema = (await harness.client.get("/openapi.json")).json()
    schemas = schema["components"]["schemas"]
    assert {"a.Item", "b.Item"} <= set(schemas)
    ref = schema["paths"]["/app/b/items"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]
    assert ref == {"$ref": "#/components/schemas/b.Item"}
    assert schema["paths"]["/app/a/items"]["post"]["tags"] == ["a"]


async def test_refused_plugin_is_not_documented(harness: Any, status_router: Any) -> None:
    await harness.load("first", 1, status_router("", "first"), "/app/shared")
    await harness.load("second", 1, item_router(), "/app/shared")
    paths = (await harness.client.get("/openapi.json")).json()["paths"]
    assert "/app/shared/items" not in paths


async def test_docs_page_is_served(harness: Any, status_router: Any) -> None:
    await harness.load("hello", 1, status_router("", "h"), "/app/hello")
    response = await harness.client.get("/docs")
    assert response.status_code == 200
    assert "/openapi.json" in response.text


async def test_requests_are_counted_per_plugin(harness: Any) -> None:
    router = APIRouter()

    @router.get("/ok")
    async def ok() -> dict[str, bool]:
        return {"ok": True}

    @router.get("/teapot")
    async def teapot() -> None:
        raise HTTPException(status_code=418)

    @router.get("/boom")
    async def boom() -> None:
        raise RuntimeError("plugin bug")

    await harness.load("hello", 1, router, "/app/hello")
    for _ in range(3):
        assert (await harness.client.get("/app/hello/ok")).status_code == 200
    assert (await harness.client.get("/app/hello/teapot")).status_code == 418
    assert (await harness.client.get("/app/hello/boom")).status_code == 500
    stats = harness.router.stats.plugin("hello")
    assert stats.requests == 5
    assert stats.by_class[2] == 3
    assert stats.by_class[4] == 1
    assert stats.by_class[5] == 1
    assert stats.errors == 1
    assert sum(stats.buckets) == 5
    assert stats.latency_sum > 0


async def test_counts_survive_a_reload(harness: Any, status_router: Any) -> None:
    await harness.load("hello", 1, status_router("", "gen1"), "/app/hello")
    await harness.client.get("/app/hello/status")
    await harness.load("hello", 2, status_router("", "gen2"), "/app/hello")
    await harness.client.get("/app/hello/status")
    assert harness.router.stats.plugin("hello").requests == 2


async def test_admin_routes_table(harness: Any, status_router: Any) -> None:
    await harness.load("hello", 1, status_router("/hello", "h"), "/app/hello")
    await harness.load("clash", 1, status_router("", "c"), "/app/hello")
    for _ in range(4):
        await harness.client.get("/app/hello/status")
    await harness.client.get("/not/a/plugin")
    await harness.kernel.settle()
    response = await harness.admin("/admin/routes")
    assert response.status_code == 200
    body = response.json()
    [row] = body["routes"]
    assert row["prefix"] == "/app/hello"
    assert row["plugin"] == "hello"
    assert row["generation"] == 1
    assert row["paths"] == ["/app/hello/status"]
    assert row["requests"] == 4
    assert row["errors"] == 0
    assert row["by_class"]["2xx"] == 4
    assert row["p50_ms"] > 0
    assert row["p99_ms"] >= row["p50_ms"]
    [conflict] = body["conflicts"]
    assert conflict["plugin"] == "clash"
    assert conflict["conflicts_with"] == "hello"
    assert body["unmatched_requests"] == 1


async def test_admin_routes_create_no_stats_for_another_nodes_plugin(harness: Any) -> None:
    mounted = RoutesMounted(plugin="far", generation=1, prefix="/app/far", paths=["/app/far/x"])
    await harness.kernel.append(
        NewEvent.of(mounted, Meta(node="some-other-node")), stream=stream_of("far")
    )
    await harness.kernel.settle()
    for _ in range(2):  # reading the table twice still adds nothing
        response = await harness.admin("/admin/routes")
        assert response.status_code == 200
        [row] = response.json()["routes"]
        assert row["plugin"] == "far"
        assert row["requests"] == 0
        assert row["errors"] == 0
        assert row["by_class"] == {"1xx": 0, "2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0}
        assert row["p50_ms"] is None
        assert row["p99_ms"] is None
    assert harness.router.stats.find("far") is None
    assert harness.router.stats.snapshot() == {}


async def test_admin_routes_refuse_a_missing_or_wrong_token(harness: Any) -> None:
    assert (await harness.admin("/admin/routes", token=None)).status_code in (401, 403)
    assert (await harness.admin("/admin/routes", token="wrong")).status_code in (401, 403)


class Unschemable:
    """A type pydantic validates but cannot describe in JSON schema."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        return core_schema.any_schema()

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: Any, handler: Any) -> Any:
        raise RuntimeError("no schema for you")


class Odd(BaseModel):
    value: Unschemable


async def test_a_plugin_whose_schema_fails_is_served_and_left_out(
    harness: Any, caplog: Any
) -> None:
    router = APIRouter()

    @router.post("/odd")
    async def odd(body: Odd) -> dict[str, str]:
        return {"got": str(body.value)}

    outcome = await harness.load("odd", 1, router, "/app/odd")
    assert outcome.data["paths"] == ["/app/odd/odd"]
    assert (await harness.client.post("/app/odd/odd", json={"value": 3})).json() == {"got": "3"}
    schema = await harness.client.get("/openapi.json")
    assert schema.status_code == 200
    assert "/app/odd/odd" not in schema.json()["paths"]
    [record] = [r for r in caplog.records if "OpenAPI schema of plugin" in r.getMessage()]
    assert "'odd' generation 1" in record.getMessage()
    assert record.exc_info is not None
