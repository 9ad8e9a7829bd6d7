"""While the scheduler tends the young collections (heap frozen), cyclic garbage made
by code that holds the event loop (a plugin's async task that never awaits) is still
collected: memory stays bounded though the policy's tick cannot run."""

from __future__ import annotations

import gc
from pathlib import Path

import anyio

from .helpers import make_kernel, spec


class _Node:
    alive = 0

    def __init__(self) -> None:
        _Node.alive += 1
        self.me = self  # a cycle: only a collection frees it

    def __del__(self) -> None:
        _Node.alive -= 1


async def test_cyclic_garbage_made_while_the_loop_is_blocked_is_collected(
    tmp_path: Path,
) -> None:
    async def work() -> None: ...

    kernel, service = make_kernel(tmp_path)
    async with kernel:
        policy = service._gc
        policy.settle = 0.05
        await service.register("p", [spec(work, every="1h")])
        with anyio.fail_after(30):
            while policy.freezes < 1:
                await anyio.sleep(0.01)
        made = 50 * gc.get_threshold()[0]
        _Node.alive = 0
        for _ in range(made):  # the loop is held all along: no tick runs meanwhile
            _Node()
        assert _Node.alive < made // 2, (_Node.alive, made)
    gc.collect()
