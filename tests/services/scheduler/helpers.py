"""Helpers of the scheduler tests (a real kernel on a real SQLite file)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from kernel import Kernel, Recorded, Settings
from kernel.sdk import TaskSpec
from services.scheduler.service import SchedulerService


def make_kernel(tmp_path: Path, **scheduler: Any) -> tuple[Kernel, SchedulerService]:
    settings = Settings(data_dir=tmp_path, node="test", services={"scheduler": scheduler})
    service = SchedulerService()
    return Kernel(settings, services=[service]), service


def spec(fn: Callable[..., Any], **options: Any) -> TaskSpec:
    """The TaskSpec ``@task(**options)`` would attach to ``fn``."""
    from kernel.sdk import task

    marked: Any = task(**options)(fn)
    result: TaskSpec = marked.__xcore_task__
    # one declaration per call: the next call on the same function is not "stacked"
    del marked.__xcore_task__, marked.__xcore_tasks__
    return result


async def wait_events(
    kernel: Kernel,
    type_name: str,
    count: int = 1,
    *,
    where: Callable[[Recorded], bool] = lambda r: True,
    timeout: float = 10.0,
) -> list[Recorded]:
    """Poll the log until ``count`` events of ``type_name`` matching ``where`` exist."""
    with anyio.fail_after(timeout):
        while True:
            found = [r for r in await kernel.read(types=[type_name]) if where(r)]
            if len(found) >= count:
                return found
            await anyio.sleep(0.01)


async def types_of(kernel: Kernel, task_id: str) -> list[str]:
    return [r.type for r in await kernel.read(stream=f"task-{task_id}")]
