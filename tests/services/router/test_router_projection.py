"""The router state projection, and its behaviour across a restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kernel import Kernel, Settings, state_at
from services.router.projection import MountedRoutes
from services.router.service import RouterService


async def test_projection_follows_mounts_and_unmounts(harness: Any, status_router: Any) -> None:
    kernel = harness.kernel
    await harness.load("hello", 1, status_router("", "gen1"), "/app/hello")
    await kernel.settle()
    state = kernel.projection(MountedRoutes)
    assert state.mounts["hello"].generation == 1
    assert state.mounts["hello"].prefix == "/app/hello"
    assert state.owner("/app/hello/status") == "hello"
    assert state.owner("/app/hellox") is None

    await harness.load("hello", 2, status_router("", "gen2"), "/app/hello")
    await harness.unload("hello", 1)
    await kernel.settle()
    assert state.mounts["hello"].generation == 2  # unloading the old one kept the new one

    await harness.unload("hello", 2)
    await kernel.settle()
    assert "hello" not in state.mounts


async def test_projection_records_and_clears_conflicts(harness: Any, status_router: Any) -> None:
    kernel = harness.kernel
    await harness.load("first", 1, status_router("", "first"), "/app/x")
    await harness.load("second", 1, status_router("", "second"), "/app/x")
    await kernel.settle()
    state = kernel.projection(MountedRoutes)
    assert state.conflicts["second"].conflicts_with == "first"
    await harness.load("second", 2, status_router("", "second"), "/app/y")
    await kernel.settle()
    assert "second" not in state.conflicts
    assert state.as_dict()["mounts"]["second"]["prefix"] == "/app/y"


async def test_state_at_a_past_position(harness: Any, status_router: Any) -> None:
    kernel = harness.kernel
    mounted = await harness.load("hello", 1, status_router("", "h"), "/app/hello")
    await harness.unload("hello", 1)
    past = await state_at(kernel.store, MountedRoutes, mounted.position)
    assert "hello" in past.mounts
    now = await state_at(kernel.store, MountedRoutes, await kernel.store.last_position())
    assert "hello" not in now.mounts


async def test_a_new_boot_starts_with_nothing_mounted(tmp_path: Path, status_router: Any) -> None:
    from kernel.runtime import PluginRuntime
    from services.loader.events import PluginLoaded
    from services.router.events import RoutesMounted

    settings = Settings(data_dir=tmp_path, node="router-test", reload=False)
    async with Kernel(settings, services=[RouterService()]) as kernel:
        kernel.plugins.put(
            PluginRuntime(
                name="hello",
                generation=1,
                version="1",
                mode="trusted",
                prefix="/app/hello",
                router=status_router("", "h"),
            )
        )
        outcome = await kernel.request(
            PluginLoaded(
                name="hello",
                version="1",
                generation=1,
                mode="trusted",
                prefix="/app/hello",
                routes=[],
                tasks=[],
                digest="d",
                duration_ms=0.0,
            ),
            stream="plugin-hello",
            outcomes=[RoutesMounted],
            timeout=10,
        )
        await kernel.settle()
        assert "hello" in kernel.projection(MountedRoutes).mounts
    async with Kernel(settings, services=[RouterService()]) as kernel:
        await kernel.settle()
        assert kernel.projection(MountedRoutes).mounts == {}
        # the log still says it was mounted in the previous boot
        assert (await state_at(kernel.store, MountedRoutes, outcome.position)).mounts[
            "hello"
        ].generation == 1
