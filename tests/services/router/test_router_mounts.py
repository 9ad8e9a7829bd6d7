"""A plugin's mount is built in a pooled executor thread (services/router/mounts.py
``build_mount``, run with ``asyncio.to_thread``): the fine-yield profile hook pacing puts
on a build thread (kernel/pacing.py) must not stay on that pooled thread for the next,
unrelated job it runs while the window is still open (a request's ``to_thread`` call, the
loader's file work), which would then wait for the event loop at every function call."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi import APIRouter

from kernel import pacing
from kernel.runtime import PluginRuntime
from services.router.mounts import build_mount
from services.router.stats import PluginStats
from tests.building import watched_loop


@pytest.fixture(autouse=True)
def _closed() -> Iterator[None]:
    yield
    pacing.set_share(1.0)


def test_a_mount_build_leaves_no_pacing_hook_on_its_pooled_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    router = APIRouter()
    for i in range(20):
        router.add_api_route(f"/r{i}", lambda: {"ok": True}, methods=["GET"])
    runtime = PluginRuntime(
        name="hooked",
        generation=1,
        version="1",
        mode="trusted",
        prefix="/app/hooked",
        router=router,
    )
    seen: dict[str, Any] = {}
    with watched_loop() as watch:
        watch.asleep = True  # the loop asleep between units: build_mount never waits
        pacing.set_share(0.99, yield_s=0.001, fine=True)

        # the loop woke for requests during every unit (under load): each pace() puts
        # the hook (back) on
        monkeypatch.setattr(pacing, "_loop_was_woken", lambda: True)

        def build() -> None:
            seen["mount"] = build_mount(runtime, PluginStats("hooked"), [])

        with ThreadPoolExecutor(max_workers=1) as pool:  # asyncio's default executor
            pool.submit(build).result(60)
            # the pool's next job (same thread), the window still open
            seen["profile"] = pool.submit(sys.getprofile).result(60)
    assert seen["mount"] is not None
    assert not getattr(seen["profile"], "xcore_pacing", False)
