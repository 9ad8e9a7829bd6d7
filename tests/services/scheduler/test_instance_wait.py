"""A timed run fired a lead ahead of its instant while the run before it is still in
progress waits (until its instant) for that run under ``max_instances``; what happens to
its task during that wait decides what it does: unscheduled meanwhile, it starts
nothing — no ``TaskStarted`` after the task's ``TaskUnscheduled`` — and ends skipped."""

from __future__ import annotations

import asyncio
from pathlib import Path

import anyio

from .helpers import make_kernel, spec, wait_events


async def test_a_run_waiting_for_its_predecessor_starts_nothing_once_its_task_is_removed(
    tmp_path: Path,
) -> None:
    kernel, service = make_kernel(tmp_path, max_lead_ms=2000)
    release = asyncio.Event()
    runs: list[str] = []

    async def slow() -> None:
        runs.append("run")
        await release.wait()

    async with kernel:
        service._runner._append_peak = 10.0  # the lead stays at its 2 s maximum
        await service.register("p", [spec(slow, name="slow", every="4s", max_instances=1)])
        entry = service._tasks["p.slow"]
        with anyio.fail_after(30):
            # the first run is in progress and the second, fired a lead ahead, waits for it
            while not (runs and any(not f.done() for f in entry.turns)):
                await anyio.sleep(0.01)
        await service.register("p", [])  # no longer declared: unscheduled
        release.set()  # the first run ends before the second one's instant
        await wait_events(kernel, "TaskSucceeded", timeout=30)
        (skipped,) = await wait_events(kernel, "TaskSkipped", timeout=30)
        await kernel.settle()
        log = await kernel.read(stream="task-p.slow")
    types = [r.type for r in log]
    after = types[types.index("TaskUnscheduled") :]
    assert "TaskStarted" not in after, types
    assert types.count("TaskStarted") == 1 and runs == ["run"], types
    assert "unscheduled" in skipped.data["reason"], skipped.data
