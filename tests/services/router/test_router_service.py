"""Mounting and unmounting plugin generations: the events, the served routes, conflicts."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
from fastapi import APIRouter, Request

from kernel import NewEvent
from kernel.events import Meta
from kernel.runtime import PluginRuntime
from services.loader.events import PluginLoaded
from services.loader.events import stream_of as plugin_stream
from services.router.events import RouteConflict, RoutesMounted, RoutesUnmounted
from services.router.events import stream_of as routes_stream


async def test_seed_example_is_served_under_the_manifest_prefix(
    harness: Any, status_router: Any
) -> None:
    outcome = await harness.load(
        "plugin_name", 1, status_router("/plugin_name", "p1"), "/app/plugin_name"
    )
    assert outcome.type == RoutesMounted.type_name
    assert outcome.data == {
        "plugin": "plugin_name",
        "generation": 1,
        "prefix": "/app/plugin_name",
        "paths": ["/app/plugin_name/status"],
    }
    assert outcome.stream == routes_stream("plugin_name")
    assert outcome.meta.actor == "router"
    response = await harness.client.get("/app/plugin_name/status")
    assert response.status_code == 200
    assert response.json() == {"plugin": "p1"}
    # the router's prefix is not doubled
    assert (await harness.client.get("/app/plugin_name/plugin_name/status")).status_code == 404


async def test_outcome_is_caused_by_the_loaders_event(harness: Any, status_router: Any) -> None:
    outcome = await harness.load("hello", 1, status_router("", "h"), "/app/hello")
    [loaded] = await harness.kernel.read(stream=plugin_stream("hello"), types=["PluginLoaded"])
    assert outcome.meta.causation_id == loaded.meta.id
    assert outcome.meta.correlation_id == loaded.meta.correlation_id


async def test_router_without_prefix_uses_the_manifest_prefix(
    harness: Any, status_router: Any
) -> None:
    outcome = await harness.load("hello", 1, status_router("", "h"), "/app/hello")
    assert outcome.data["paths"] == ["/app/hello/status"]
    assert (await harness.client.get("/app/hello/status")).json() == {"plugin": "h"}


async def test_other_router_prefix_is_kept_below(harness: Any, status_router: Any) -> None:
    outcome = await harness.load("hello", 1, status_router("/v1", "h"), "/app/hello")
    assert outcome.data["paths"] == ["/app/hello/v1/status"]
    assert (await harness.client.get("/app/hello/v1/status")).json() == {"plugin": "h"}


async def test_plugin_without_router_mounts_nothing(harness: Any) -> None:
    table = harness.router.dispatcher.table
    outcome = await harness.load("tasks_only", 1, None, None)
    assert outcome.type == RoutesMounted.type_name
    assert outcome.data["prefix"] == ""
    assert outcome.data["paths"] == []
    assert harness.router.dispatcher.table is table  # nothing to swap


async def test_a_runtime_is_left_as_published_and_mounts_the_same_again(
    harness: Any, status_router: Any
) -> None:
    # the built app is the router's own: written into runtime.asgi_app it would read
    # as a sandbox proxy, and a second mount of the runtime would take the wrong branch
    first = await harness.load("hello", 1, status_router("", "h"), "/app/hello")
    runtime = harness.kernel.plugins.get("hello", 1)
    assert runtime.asgi_app is None
    assert runtime.extra == {}
    await harness.unload("hello", 1)
    again = await harness.load("hello", 1, None, None, publish=False)
    assert again.type == RoutesMounted.type_name
    assert again.data == first.data
    assert again.data["paths"] == ["/app/hello/status"]
    assert (await harness.client.get("/app/hello/status")).json() == {"plugin": "h"}


async def test_a_redelivered_loaded_event_is_answered_and_changes_nothing(
    harness: Any, status_router: Any
) -> None:
    first = await harness.load("hello", 1, status_router("", "h"), "/app/hello")
    table = harness.router.dispatcher.table
    again = await harness.load("hello", 1, None, None, publish=False)
    assert again.type == RoutesMounted.type_name
    assert again.data == first.data
    assert harness.router.dispatcher.table is table


async def test_same_prefix_is_refused_and_the_first_keeps_serving(
    harness: Any, status_router: Any
) -> None:
    await harness.load("first", 1, status_router("", "first"), "/app/shared")
    outcome = await harness.load("second", 1, status_router("", "second"), "/app/shared")
    assert outcome.type == RouteConflict.type_name
    assert outcome.data["conflicts_with"] == "first"
    assert outcome.data["paths"] == ["/app/shared/status"]
    assert "'second'" in outcome.data["reason"]
    assert (await harness.client.get("/app/shared/status")).json() == {"plugin": "first"}


async def test_nested_prefixes_overlap_and_are_refused(harness: Any, status_router: Any) -> None:
    await harness.load("outer", 1, status_router("", "outer"), "/app")
    inner = await harness.load("inner", 1, status_router("", "inner"), "/app/inner")
    assert inner.type == RouteConflict.type_name
    assert inner.data["conflicts_with"] == "outer"
    # and a prefix next to it (not on a segment boundary) is fine
    await harness.unload("outer", 1)
    await harness.load("a", 1, status_router("", "a"), "/app/a")
    ab = await harness.load("ab", 1, status_router("", "ab"), "/app/ab")
    assert ab.type == RoutesMounted.type_name
    assert (await harness.client.get("/app/a/status")).json() == {"plugin": "a"}
    assert (await harness.client.get("/app/ab/status")).json() == {"plugin": "ab"}


async def test_reserved_prefixes_are_refused(harness: Any, status_router: Any) -> None:
    for prefix in ("/admin", "/admin/hello", "/docs", "/health"):
        outcome = await harness.load("sneaky", 1, status_router("", "sneaky"), prefix)
        assert outcome.type == RouteConflict.type_name, prefix
        assert outcome.data["conflicts_with"] == "kernel"
        assert "reserves" in outcome.data["reason"]
    assert (await harness.client.get("/health/live")).json() == {"status": "ok"}
    assert harness.router.dispatcher.table.by_plugin == {}


async def test_invalid_prefix_is_refused_naming_the_plugin(
    harness: Any, status_router: Any
) -> None:
    outcome = await harness.load("bad", 1, status_router("", "bad"), "/app/{x}")
    assert outcome.type == RouteConflict.type_name
    assert outcome.data["conflicts_with"] == ""
    assert "plugin 'bad' generation 1" in outcome.data["reason"]
    assert "'{x}'" in outcome.data["reason"]


async def test_a_router_that_is_not_an_apirouter_is_refused(harness: Any) -> None:
    outcome = await harness.load("bad", 1, object(), "/app/bad")
    assert outcome.type == RouteConflict.type_name
    assert "fastapi.APIRouter" in outcome.data["reason"]


async def test_missing_runtime_is_refused(harness: Any) -> None:
    outcome = await harness.load("ghost", 3, None, "/app/ghost", publish=False)
    assert outcome.type == RouteConflict.type_name
    assert "no runtime" in outcome.data["reason"]


async def test_reload_swaps_and_in_flight_requests_finish_on_their_generation(harness: Any) -> None:
    entered = asyncio.Event()
    release = asyncio.Event()

    gen1 = APIRouter()

    @gen1.get("/work")
    async def slow_work() -> dict[str, int]:
        entered.set()
        await release.wait()
        return {"generation": 1}

    gen2 = APIRouter()

    @gen2.get("/work")
    async def quick_work() -> dict[str, int]:
        return {"generation": 2}

    await harness.load("hello", 1, gen1, "/app/hello")
    with anyio.fail_after(10):
        in_flight = asyncio.create_task(harness.client.get("/app/hello/work"))
        await entered.wait()
        outcome = await harness.load("hello", 2, gen2, "/app/hello")
        assert outcome.type == RoutesMounted.type_name
        assert (await harness.client.get("/app/hello/work")).json() == {"generation": 2}
        release.set()
        assert (await in_flight).json() == {"generation": 1}


async def test_unloading_the_replaced_generation_keeps_the_new_one(
    harness: Any, status_router: Any
) -> None:
    await harness.load("hello", 1, status_router("", "gen1"), "/app/hello")
    await harness.load("hello", 2, status_router("", "gen2"), "/app/hello")
    outcome = await harness.unload("hello", 1)
    assert outcome.type == RoutesUnmounted.type_name
    assert outcome.data == {"plugin": "hello", "generation": 1, "prefix": "/app/hello"}
    assert (await harness.client.get("/app/hello/status")).json() == {"plugin": "gen2"}
    await harness.unload("hello", 2)
    assert (await harness.client.get("/app/hello/status")).status_code == 404


async def test_reload_may_move_the_prefix(harness: Any, status_router: Any) -> None:
    await harness.load("hello", 1, status_router("", "gen1"), "/app/hello")
    await harness.load("hello", 2, status_router("", "gen2"), "/app/hello2")
    assert (await harness.client.get("/app/hello/status")).status_code == 404
    assert (await harness.client.get("/app/hello2/status")).json() == {"plugin": "gen2"}


async def test_reload_into_a_plugin_without_routes_drops_its_routes(
    harness: Any, status_router: Any
) -> None:
    await harness.load("hello", 1, status_router("", "gen1"), "/app/hello")
    outcome = await harness.load("hello", 2, None, None)
    assert outcome.data["paths"] == []
    assert (await harness.client.get("/app/hello/status")).status_code == 404


async def test_an_older_generation_is_refused(harness: Any, status_router: Any) -> None:
    await harness.load("hello", 2, status_router("", "gen2"), "/app/hello")
    outcome = await harness.load("hello", 1, status_router("", "gen1"), "/app/hello")
    assert outcome.type == RouteConflict.type_name
    assert "older than generation 2" in outcome.data["reason"]
    assert (await harness.client.get("/app/hello/status")).json() == {"plugin": "gen2"}


async def test_unloading_a_generation_never_mounted_is_answered(harness: Any) -> None:
    outcome = await harness.unload("nobody", 7)
    assert outcome.data == {"plugin": "nobody", "generation": 7, "prefix": ""}


async def test_another_nodes_plugin_events_are_ignored(harness: Any, status_router: Any) -> None:
    kernel = harness.kernel
    kernel.plugins.put(
        PluginRuntime(
            name="far",
            generation=1,
            version="1",
            mode="trusted",
            prefix="/app/far",
            router=status_router("", "far"),
        )
    )
    foreign = PluginLoaded(
        name="far",
        version="1",
        generation=1,
        mode="trusted",
        prefix="/app/far",
        routes=[],
        tasks=[],
        digest="d",
        duration_ms=0.0,
    )
    ne = NewEvent.of(foreign, Meta(node="some-other-node"))
    [recorded] = await kernel.append(ne, stream=plugin_stream("far"))
    # an event of this node recorded after it is answered, so the foreign one was handled before
    await harness.load("near", 1, status_router("", "near"), "/app/near")
    answers = await kernel.read(stream=routes_stream("far"))
    assert answers == []
    assert recorded.meta.node == "some-other-node"
    assert (await harness.client.get("/app/far/status")).status_code == 404


async def test_plugin_routes_resolve_their_own_url_names(harness: Any) -> None:
    router = APIRouter()

    @router.get("/items/{item_id}", name="item")
    async def item(item_id: int, request: Request) -> dict[str, str]:
        return {"self": str(request.url_for("item", item_id=item_id))}

    await harness.load("hello", 1, router, "/app/hello")
    response = await harness.client.get("/app/hello/items/3")
    assert response.json() == {"self": f"{harness.url}/app/hello/items/3"}


async def test_sync_endpoints_and_bodies_work(harness: Any) -> None:
    router = APIRouter(prefix="/echo")

    @router.post("/upper")
    def upper(payload: dict[str, str]) -> dict[str, str]:
        return {k: v.upper() for k, v in payload.items()}

    await harness.load("echo", 1, router, "/app/echo")
    response = await harness.client.post("/app/echo/upper", json={"a": "bc"})
    assert response.json() == {"a": "BC"}


async def test_a_runtime_with_its_own_asgi_app_is_mounted_as_it_is(harness: Any) -> None:
    # what a sandbox proxy looks like to the router: an ASGI app and announced routes
    seen: list[str] = []

    async def proxy(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["path"])
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        await send({"type": "http.response.body", "body": b"proxied"})

    outcome = await harness.load(
        "boxed", 1, None, "/app/boxed", asgi_app=proxy, routes=["/app/boxed/x"], mode="sandboxed"
    )
    assert outcome.type == RoutesMounted.type_name
    assert outcome.data["paths"] == ["/app/boxed/x"]
    response = await harness.client.get("/app/boxed/x")
    assert response.text == "proxied"
    assert seen == ["/app/boxed/x"]  # the full public path, unchanged
    assert harness.kernel.plugins.get("boxed", 1).asgi_app is proxy
    assert harness.router.stats.plugin("boxed").by_class[2] == 1


async def test_stopping_the_kernel_empties_the_table(harness: Any, status_router: Any) -> None:
    await harness.load("hello", 1, status_router("", "h"), "/app/hello")
    dispatcher = harness.router.dispatcher
    assert set(dispatcher.table.by_plugin) == {"hello"}
    await harness.kernel.stop()
    assert dispatcher.table.by_plugin == {}
