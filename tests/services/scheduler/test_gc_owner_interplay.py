"""The scheduler's GC policy and the process's collector owner (kernel/collector.py) in
one process: a scheduler that stops (a kernel stopped while another, or the loader,
still holds the collector: two nodes in one process, an embedding app, tests) gives back
what it changed itself and nothing of the owner's — the owner's frozen boot layer stays
frozen and its full collections stay its own."""

from __future__ import annotations

import gc
from pathlib import Path

import anyio

from kernel.collector import SENTINEL, collector

from .helpers import make_kernel, spec


async def work() -> None: ...


async def test_a_scheduler_stopping_leaves_the_owners_boot_layer_frozen(tmp_path: Path) -> None:
    threshold = gc.get_threshold()
    collector.acquire()
    try:
        boot = gc.get_freeze_count()
        assert collector.held and boot > 0
        kernel, service = make_kernel(tmp_path)
        async with kernel:
            await service.register("p", [spec(work, every="1h")])
        # the scheduler stopped; the owner still holds the collector (objects of the
        # layer freed by refcounting leave it: not all of it is still there)
        assert gc.get_freeze_count() > boot // 2, "the owner's boot layer was thawed"
        assert gc.get_threshold()[2] == SENTINEL
    finally:
        await collector.release()
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == threshold


async def test_a_scheduler_that_froze_before_an_owner_came_stops_without_undoing_it(
    tmp_path: Path,
) -> None:
    threshold = gc.get_threshold()
    kernel, service = make_kernel(tmp_path)
    held = False
    try:
        async with kernel:
            service._gc.settle = 0.05
            await service.register("p", [spec(work, every="1h")])
            with anyio.fail_after(30):
                while service._gc.freezes < 1:
                    await anyio.sleep(0.01)
            collector.acquire()  # an owner comes (a loader's kernel starts in-process)
            held = True
            boot = gc.get_freeze_count()
        # the scheduler stopped: its own generation-0 threshold is back, the owner's
        # boot layer and its out-of-reach generation-2 threshold are untouched
        assert gc.get_freeze_count() > boot // 2, "the owner's boot layer was thawed"
        assert gc.get_threshold()[2] == SENTINEL, "full collections taken from the owner"
        assert gc.get_threshold()[0] == threshold[0]
    finally:
        if held:
            await collector.release()
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == threshold
