"""A background step that outlives the scheduler's stop is no failure of the scheduler."""

from __future__ import annotations

import asyncio
import logging

import pytest

from kernel.errors import KernelStateError
from services.scheduler.runner import Runner

pytestmark = pytest.mark.anyio


def _runner() -> Runner:
    async def never(*args: object, **kwargs: object) -> None:
        return None

    return Runner(blocked=never, finished=never, retry=never)  # type: ignore[arg-type]


async def _step(release: asyncio.Event, exc: Exception) -> None:
    await release.wait()
    raise exc


async def test_a_step_refused_by_a_stopped_kernel_after_the_stop_is_a_warning(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="xcore.scheduler")
    runner = _runner()
    release = asyncio.Event()
    runner.spawn(_step(release, KernelStateError("the kernel is not started")))
    runner.closed = True  # as stop() sets it; the step is still on its way
    release.set()
    await asyncio.sleep(0.05)
    records = [r for r in caplog.records if r.name == "xcore.scheduler"]
    assert [r.levelno for r in records] == [logging.WARNING]
    assert "the kernel is not started" in records[0].getMessage()


async def test_any_other_failure_of_a_step_is_an_error_with_its_traceback(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="xcore.scheduler")
    runner = _runner()
    release = asyncio.Event()
    runner.spawn(_step(release, KernelStateError("the kernel is not started")))
    release.set()  # not stopping: a refused append is a real failure
    await asyncio.sleep(0.05)
    records = [r for r in caplog.records if r.name == "xcore.scheduler"]
    assert [r.levelno for r in records] == [logging.ERROR] and records[0].exc_info
