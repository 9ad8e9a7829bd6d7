"""The runner's edges: sync code that outlives its run, cancellation mid-write."""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from pathlib import Path

import anyio
import pytest

from kernel.sdk import current_task
from services.scheduler.events import TaskMissed, TaskPauseRequested, TaskRunRequested
from services.scheduler.projection import TaskTable

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
            # the run is over for the log, but its code still holds the only slot (and
            # the line has not moved: no start is written ahead on its account)
            assert runner.slots.busy == 1
            assert runner.released_at == 0.0
            await service.register("q", [spec(other, after=0)])
            with anyio.fail_after(10):
                while runner.slots.waiting == 0:
                    await anyio.sleep(0.01)
            # (its start may be recorded already: it is next in line; its code has not run)
            assert ran == [] and not await kernel.read(types=["TaskSucceeded"])
            release.set()  # the thread returns: its slot goes to the waiting run
            await wait_events(kernel, "TaskSucceeded", where=lambda r: r.data["task"] == "q.other")
            assert ran == ["stuck", "other"]
            assert runner.slots.busy == 0 and runner.released_at > 0
    finally:
        release.set()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("p.stuck" in m and "still running in its thread" in m for m in warnings)


async def test_a_run_cancelled_while_its_start_is_written_records_its_end(
    tmp_path: Path,
) -> None:
    async def work() -> None: ...

    kernel, service = make_kernel(tmp_path)
    runner = service._runner
    async with kernel:
        await service.register("p", [spec(work, every="1h")])
        entry = service._tasks["p.work"]
        now = time.time()
        runner.spawn(
            runner.run(entry, "r1", now, attempt=1, kind="request", next_run=None, start_at=now)
        )
        # one loop step: the run took its slot and waits for its TaskStarted to be written
        await asyncio.sleep(0)
        runner.cancel_runs("p", None, "cancelled: plugin p was unloaded")
        failed = await wait_events(kernel, "TaskFailed")
        started = await kernel.read(types=["TaskStarted"])
        assert [r.data["run_id"] for r in started] == ["r1"]
        assert failed[0].data["run_id"] == "r1" and failed[0].data["kind"] == "cancelled"
        assert failed[0].data["error"] == "cancelled: plugin p was unloaded"
        await kernel.settle()
        assert not kernel.projection(TaskTable).tasks["p.work"].running
        assert runner.slots.busy == 0


async def test_a_run_cancelled_waiting_for_a_slot_keeps_its_missed_runs(tmp_path: Path) -> None:
    async def work() -> None: ...

    kernel, service = make_kernel(tmp_path, max_concurrency=1)
    runner = service._runner
    async with kernel:
        await service.register("p", [spec(work, every="1h")])
        entry = service._tasks["p.work"]
        await runner.slots.acquire(0, 0.0)  # the only slot is taken
        now = time.time()
        missed = TaskMissed(task="p.work", count=3, first=now - 3, last=now, policy="run_once")
        runner.spawn(
            runner.run(
                entry,
                "r1",
                now,
                attempt=1,
                kind="misfire",
                next_run=None,
                start_at=now,
                pre=[missed],
            )
        )
        with anyio.fail_after(10):
            while runner.slots.waiting == 0:
                await asyncio.sleep(0.01)
        runner.cancel_runs("p", None, "cancelled: plugin p was unloaded")
        found = await wait_events(kernel, "TaskMissed")
        assert found[0].data["count"] == 3
        # next in line, it may have recorded its start while waiting: then its end too
        if await kernel.read(types=["TaskStarted"]):
            [failed] = await wait_events(kernel, "TaskFailed")
            assert failed.data["kind"] == "cancelled" and failed.data["run_id"] == "r1"
        runner.slots.release()


async def test_a_run_far_back_in_line_records_nothing_before_its_slot(tmp_path: Path) -> None:
    async def work() -> None: ...

    kernel, service = make_kernel(tmp_path, max_concurrency=1)
    runner = service._runner
    async with kernel:
        await service.register("p", [spec(work, every="1h"), spec(work, every="1h", name="w2")])
        await runner.slots.acquire(0, 0.0)  # the only slot is taken
        waiter = asyncio.ensure_future(runner.slots.acquire(0, 0.0))  # one waits already
        await asyncio.sleep(0)
        now = time.time()
        entry = service._tasks["p.w2"]
        runner.spawn(
            runner.run(entry, "r2", now, attempt=1, kind="schedule", next_run=None, start_at=now)
        )
        with anyio.fail_after(10):
            while runner.slots.waiting < 2:
                await asyncio.sleep(0.01)
        assert not await kernel.read(types=["TaskStarted"])  # not in the next wave
        runner.slots.release()  # the first waiter gets it
        await waiter
        runner.slots.release()  # now r2's turn
        await wait_events(kernel, "TaskSucceeded")
        assert runner.slots.busy == 0


async def test_nothing_starts_once_the_service_is_stopping(tmp_path: Path) -> None:
    ran: list[str] = []

    async def first() -> None: ...

    async def then() -> None:
        ran.append("then")

    async def probe() -> None:
        ran.append("probe")

    kernel, service = make_kernel(tmp_path)
    runner = service._runner
    async with kernel:
        await service.register(
            "p", [spec(first, every="1h"), spec(then, depends_on="first", depends_rule="finished")]
        )
        sub = service._sub
        assert sub is not None and sub in kernel._subscriptions
        service._tasks["p.first"].last_outcome = "succeeded"
        await service._stop()  # the first step of the kernel's shutdown for this service
        assert sub not in kernel._subscriptions  # plugin events and requests stop here
        # a run finishing during the shutdown does not start its dependents
        service._dispatch._after_finish("p.first")
        service._dispatch.run_now(service._tasks["p.first"], "r-late", "request-late")
        assert not runner._background
        coro = probe()
        runner.spawn(coro)  # closed unrun, not scheduled
        assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED
        await asyncio.sleep(0)
        assert ran == []
        assert not await kernel.read(types=["TaskStarted"])


async def test_a_paused_task_drops_its_retries(tmp_path: Path) -> None:
    calls: list[int] = []

    async def flaky() -> None:
        calls.append(current_task().attempt)
        raise RuntimeError("boom")

    kernel, service = make_kernel(tmp_path)
    async with kernel:
        await service.register("p", [spec(flaky, every="1h", retries=2, retry_delay="0.05s")])
        stream = "task-p.flaky"
        await kernel.append(TaskPauseRequested(task="p.flaky"), stream=stream)
        await wait_events(kernel, "TaskPaused")
        # a run asked for by hand still runs; its failure schedules a retry
        await kernel.append(TaskRunRequested(task="p.flaky"), stream=stream)
        retry = await wait_events(kernel, "TaskRetryScheduled")
        skipped = await wait_events(kernel, "TaskSkipped")
        assert skipped[0].data["run_id"] == retry[0].data["run_id"]
        assert skipped[0].data["reason"] == "paused: retry (attempt 2) dropped"
        assert calls == [1]
        assert [r.type for r in await kernel.read(types=["TaskStarted"])] == ["TaskStarted"]
        await kernel.settle()
        assert not kernel.projection(TaskTable).tasks["p.flaky"].retries  # none pending


async def test_a_run_back_in_a_fast_line_writes_its_start_while_it_waits(
    tmp_path: Path,
) -> None:
    """The write-ahead rule of a full limit: when the slots turn over fast (runs keep
    them ~1 ms), a run two waves back records its start while it waits, so its fsync is
    not added to its lateness; when they turn over slowly, it records nothing before
    its slot (see test_a_run_far_back_in_line_records_nothing_before_its_slot)."""

    async def work() -> None: ...

    kernel, service = make_kernel(tmp_path, max_concurrency=1)
    runner = service._runner
    async with kernel:
        await service.register("p", [spec(work, every="1h", name="w2")])
        await runner.slots.acquire(0, 0.0)  # the only slot is taken
        waiter = asyncio.ensure_future(runner.slots.acquire(0, 0.0))  # one waits already
        await asyncio.sleep(0)
        runner.hold = 0.001  # the slots turn over in ~1 ms: its turn comes at once
        runner.released_at = time.perf_counter()  # and the line is moving
        now = time.time()
        entry = service._tasks["p.w2"]
        runner.spawn(
            runner.run(entry, "r2", now, attempt=1, kind="schedule", next_run=None, start_at=now)
        )
        [started] = await wait_events(kernel, "TaskStarted")
        assert started.data["run_id"] == "r2"
        # recorded before its slot: it now waits in line, behind the other waiter
        with anyio.fail_after(10):
            while runner.slots.waiting < 2:
                await asyncio.sleep(0.01)
        assert runner.slots.busy == 1
        assert not await kernel.read(types=["TaskSucceeded"])
        runner.slots.release()
        await waiter
        runner.slots.release()
        [done] = await wait_events(kernel, "TaskSucceeded")
        assert done.data["run_id"] == "r2"
        assert runner.slots.busy == 0 and runner.slots.waiting == 0


async def test_a_stalled_line_writes_nothing_ahead_whatever_the_past_pace(
    tmp_path: Path,
) -> None:
    """Fast runs seen before say nothing of slow ones holding every slot now: when no
    slot was given back for longer than AHEAD_WAIT, a run back in the line waits for its
    slot before recording its start."""

    async def work() -> None: ...

    kernel, service = make_kernel(tmp_path, max_concurrency=1)
    runner = service._runner
    async with kernel:
        await service.register("p", [spec(work, every="1h", name="w2")])
        await runner.slots.acquire(0, 0.0)  # the only slot is taken, for long
        waiter = asyncio.ensure_future(runner.slots.acquire(0, 0.0))
        await asyncio.sleep(0)
        runner.hold = 0.001  # the recent pace was fast...
        runner.released_at = time.perf_counter() - 10  # ...but nothing moved for 10 s
        now = time.time()
        entry = service._tasks["p.w2"]
        runner.spawn(
            runner.run(entry, "r2", now, attempt=1, kind="schedule", next_run=None, start_at=now)
        )
        with anyio.fail_after(10):
            while runner.slots.waiting < 2:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # (a start written ahead would be durable by now)
        assert not await kernel.read(types=["TaskStarted"])
        runner.slots.release()
        await waiter
        runner.slots.release()
        [done] = await wait_events(kernel, "TaskSucceeded")
        assert done.data["run_id"] == "r2"
