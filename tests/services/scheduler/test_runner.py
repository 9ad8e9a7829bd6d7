"""The runner's edges: sync code that outlives its run, cancellation mid-write."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import anyio
import pytest

from .helpers import make_kernel, spec, wait_events


async def test_a_timed_out_sync_run_keeps_its_slot_until_its_thread_returns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    release = threading.Event()
    ran: list[str] = []

    def stuck() -> None:
        release.wait(30)
        ran.append("stuck")

    async def other() -> None:
        ran.append("other")

    kernel, service = make_kernel(tmp_path, max_concurrency=1)
    runner = service._runner
    try:
        async with kernel:
            await service.register("p", [spec(stuck, after=0, timeout="0.05s")])
            failed = await wait_events(kernel, "TaskFailed")
            assert failed[0].data["kind"] == "timeout"
            assert "still running in its thread" in failed[0].data["error"]
            # the run is over for the log, but its code still holds the only slot
            assert runner.slots.busy == 1
            await service.register("q", [spec(other, after=0)])
            with anyio.fail_after(10):
                while runner.slots.waiting == 0:
                    await anyio.sleep(0.01)
            assert not await kernel.read(types=["TaskStarted"], stream="task-q.other")
            release.set()  # the thread returns: its slot goes to the waiting run
            await wait_events(kernel, "TaskSucceeded", where=lambda r: r.data["task"] == "q.other")
            assert ran == ["stuck", "other"]
            assert runner.slots.busy == 0
    finally:
        release.set()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("p.stuck" in m and "still running in its thread" in m for m in warnings)
