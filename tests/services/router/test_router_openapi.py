"""Namespacing a plugin's OpenAPI schema before it is merged into /openapi.json."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import APIRouter, Depends, FastAPI
from fastapi.security import HTTPBearer
from pydantic import BaseModel

from services.router.openapi import merge_fragments, namespace, plugin_fragment

bearer = HTTPBearer()


class Item(BaseModel):
    name: str


def _schema(title: str, with_security: bool = False) -> dict:
    router = APIRouter()

    @router.post("/app/" + title + "/items", tags=[] if with_security else ["items"])
    async def create(item: Item) -> Item:
        return item

    if with_security:

        @router.get("/app/" + title + "/secret", dependencies=[Depends(bearer)])
        async def secret() -> dict[str, str]:
            return {}

    app = FastAPI(openapi_url=None)
    app.include_router(router)
    return app.openapi()


def test_component_schemas_are_renamed_and_refs_follow() -> None:
    fragment = plugin_fragment(_schema("a"), "a")
    schemas = fragment["components"]["schemas"]
    assert "a.Item" in schemas
    assert "Item" not in schemas
    body = fragment["paths"]["/app/a/items"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/a.Item"


def test_two_plugins_item_models_do_not_collide() -> None:
    merged = merge_fragments(
        [plugin_fragment(_schema("a"), "a"), plugin_fragment(_schema("b"), "b")]
    )
    assert {"a.Item", "b.Item"} <= set(merged["components"]["schemas"])
    assert set(merged["paths"]) == {"/app/a/items", "/app/b/items"}


def test_fastapi_validation_schemas_stay_shared() -> None:
    fragment = plugin_fragment(_schema("a"), "a")
    schemas = fragment["components"]["schemas"]
    assert "HTTPValidationError" in schemas
    assert "a.HTTPValidationError" not in schemas


def test_untagged_operations_get_the_plugin_name_and_tags_are_kept() -> None:
    tagged = plugin_fragment(_schema("a"), "a")
    assert tagged["paths"]["/app/a/items"]["post"]["tags"] == ["items"]
    untagged = plugin_fragment(_schema("b", with_security=True), "b")
    assert untagged["paths"]["/app/b/items"]["post"]["tags"] == ["b"]


def test_security_schemes_are_renamed_with_their_requirements() -> None:
    fragment = plugin_fragment(_schema("b", with_security=True), "b")
    assert set(fragment["components"]["securitySchemes"]) == {"b.HTTPBearer"}
    assert fragment["paths"]["/app/b/secret"]["get"]["security"] == [{"b.HTTPBearer": []}]


def test_the_source_schema_is_not_modified() -> None:
    schema = _schema("a")
    plugin_fragment(schema, "a")
    assert "Item" in schema["components"]["schemas"]


def test_namespace_keeps_only_characters_openapi_allows() -> None:
    assert namespace("my plugin/ü") == "my_plugin__"
    assert namespace("hello-world_2.x") == "hello-world_2.x"


# -- built when needed (issue 8: a reload does not wait for its OpenAPI) ------------------


def _router(path: str) -> APIRouter:
    router = APIRouter()

    @router.post(path)
    async def create(item: Item) -> Item:
        return item

    return router


@pytest.mark.anyio
async def test_a_generations_fragment_is_built_when_needed_and_served_fresh(
    harness: Any,
) -> None:
    """A mounted generation's fragment is not built by the mount; /openapi.json builds
    it and shows the generation being served, before and after a reload."""
    import anyio

    with anyio.fail_after(60):
        await harness.load("lazy", 1, _router("/one"), "/app/lazy")
        mount = harness.router.dispatcher.table.by_plugin["lazy"]
        assert mount.openapi is not None and not mount.openapi.ready
        doc = (await harness.client.get("/openapi.json")).json()
        assert "/app/lazy/one" in doc["paths"]
        assert mount.openapi.ready
        await harness.load("lazy", 2, _router("/two"), "/app/lazy")
        doc = (await harness.client.get("/openapi.json")).json()
        assert "/app/lazy/two" in doc["paths"] and "/app/lazy/one" not in doc["paths"]
        assert "lazy.Item" in doc["components"]["schemas"]
        again = harness.router.dispatcher.table.by_plugin["lazy"]
        assert again is not mount and again.openapi is not None and again.openapi.ready
