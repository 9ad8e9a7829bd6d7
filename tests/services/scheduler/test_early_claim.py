"""A run's start record is written a lead ahead of its due time (``max_lead_ms``); what
happens to the task between that early claim and the instant decides what runs: a
task paused or removed meanwhile runs nothing (the claimed run ends cancelled), a task
reloaded meanwhile runs its new code, never the old."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import anyio

from kernel import Kernel, Recorded
from services.scheduler.events import (
    TaskPaused,
    TaskPauseRequested,
    TaskRequestRefused,
    stream_of,
)

from .helpers import make_kernel, spec, wait_events

#: a lead long enough that the test acts between the early claim and the instant on
#: any machine (the instant itself is what the assertions wait for, not a duration)
LEAD_MS = 4000


def _at(seconds: float) -> str:
    return datetime.fromtimestamp(time.time() + seconds, UTC).isoformat()


async def _claimed(kernel: Kernel, tid: str) -> Recorded:
    (started,) = await wait_events(kernel, "TaskStarted", where=lambda r: r.data["task"] == tid)
    assert started.data["scheduled_for"] > time.time()  # claimed ahead of its instant
    return started


async def _outcome(kernel: Kernel, run_id: str) -> Recorded:
    with anyio.fail_after(60):
        while True:
            for r in await kernel.read(types=["TaskSucceeded", "TaskFailed"]):
                if r.data["run_id"] == run_id:
                    return r
            await anyio.sleep(0.02)


async def test_a_task_paused_between_its_early_claim_and_its_instant_runs_nothing(
    tmp_path: Path,
) -> None:
    kernel, service = make_kernel(tmp_path, max_lead_ms=LEAD_MS)
    ran: list[str] = []

    async def work() -> None:
        ran.append("ran")

    async with kernel:
        await service.register("p", [spec(work, name="job", at=_at(6))])
        started = await _claimed(kernel, "p.job")
        answer = await kernel.request(
            TaskPauseRequested(task="p.job"),
            stream=stream_of("p.job"),
            outcomes=[TaskPaused, TaskRequestRefused],
        )
        assert answer.type == "TaskPaused"
        end = await _outcome(kernel, started.data["run_id"])
        assert end.type == "TaskFailed" and end.data["kind"] == "cancelled", end.data
        assert "paused" in end.data["error"]
        assert ran == []


async def test_a_task_removed_between_its_early_claim_and_its_instant_runs_nothing(
    tmp_path: Path,
) -> None:
    kernel, service = make_kernel(tmp_path, max_lead_ms=LEAD_MS)
    ran: list[str] = []

    async def work() -> None:
        ran.append("ran")

    async def other() -> None: ...

    async with kernel:
        await service.register("p", [spec(work, name="job", at=_at(6))])
        started = await _claimed(kernel, "p.job")
        # the plugin no longer declares it (a runtime schedule removed: the same path)
        await service.register("p", [spec(other, name="other", every="1h")])
        assert "p.job" not in service._tasks
        end = await _outcome(kernel, started.data["run_id"])
        assert end.type == "TaskFailed" and end.data["kind"] == "cancelled", end.data
        assert ran == []


async def test_a_task_reloaded_between_its_early_claim_and_its_instant_runs_the_new_code(
    tmp_path: Path,
) -> None:
    kernel, service = make_kernel(tmp_path, max_lead_ms=LEAD_MS)
    ran: list[str] = []

    async def old() -> None:
        ran.append("old")

    async def new() -> None:
        ran.append("new")

    at = _at(6)
    async with kernel:
        await service.register("p", [spec(old, name="job", at=at)], generation=1)
        started = await _claimed(kernel, "p.job")
        await service.register("p", [spec(new, name="job", at=at)], generation=2)
        end = await _outcome(kernel, started.data["run_id"])
        assert end.type == "TaskSucceeded", end.data
        assert ran == ["new"]
