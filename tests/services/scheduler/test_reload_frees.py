"""A plugin generation whose tasks were replaced (a reload) or unregistered is freed: the
scheduler keeps nothing of its functions (the signature check's cache included), so
memory does not grow with each reload of a plugin with tasks (every unloaded generation
was reported leaked by the loader's /health, and its module's data kept)."""

from __future__ import annotations

import gc
import types
import weakref
from pathlib import Path

from .helpers import make_kernel, spec


def _generation(n: int) -> types.ModuleType:
    module = types.ModuleType(f"plugin_gen_{n}")
    exec("DATA = list(range(1000))\nasync def work(n: int = 0) -> None: ...\n", module.__dict__)
    return module


async def test_a_replaced_or_unregistered_generation_s_task_functions_are_freed(
    tmp_path: Path,
) -> None:
    kernel, service = make_kernel(tmp_path)
    async with kernel:
        old = _generation(1)
        gone = weakref.ref(old.work)
        await service.register("p", [spec(old.work, name="w", every="1h", args=[1])])
        new = _generation(2)
        await service.register("p", [spec(new.work, name="w", every="1h", args=[2])])
        del old
        gc.collect()
        assert gone() is None, "the replaced generation's task function is still held"

        gone = weakref.ref(new.work)
        await service.unregister("p")
        del new
        gc.collect()
        assert gone() is None, "the unregistered generation's task function is still held"
