"""Work that is not a start yields to the burst: while a run's start record is being
written or the run waits in the start gate for its instant (a *start window*), the GC
policy runs no collection; outside it, young collections run early and small, before the
young generation grows to CPython's overdue threshold (a 10-35 ms pause with 10,000
schedules, measured: docs/scheduler.md)."""

from __future__ import annotations

import gc
import time
from datetime import UTC, datetime
from pathlib import Path

import anyio

from .helpers import make_kernel, spec, wait_events

#: a lead long enough that the test looks at the window between the early claim and the
#: instant on any machine (the assertions wait for events, not for durations)
LEAD_MS = 4000


def _at(seconds: float) -> str:
    return datetime.fromtimestamp(time.time() + seconds, UTC).isoformat()


async def _frozen(service: object, idle: bool = False) -> None:
    policy = service._gc  # type: ignore[attr-defined]
    policy.settle = 0.05
    if not idle:  # the tick's 10 ms pace (not the idle one) is what these tests look at
        policy.idle_tick = 0
    with anyio.fail_after(30):
        while policy.freezes < 1 or policy._young is None:
            await anyio.sleep(0.01)


async def test_no_collection_while_a_claimed_run_waits_for_its_instant(tmp_path: Path) -> None:
    kernel, service = make_kernel(tmp_path, max_lead_ms=LEAD_MS)
    ran: list[float] = []

    async def work() -> None:
        ran.append(time.time())

    async with kernel:
        await service.register("p", [spec(work, name="job", at=_at(6))])
        await _frozen(service)
        dispatch, policy = service._dispatch, service._gc
        (started,) = await wait_events(
            kernel, "TaskStarted", where=lambda r: r.data["task"] == "p.job"
        )
        assert started.data["scheduled_for"] > time.time()  # claimed, before its instant
        with anyio.fail_after(30):
            while not dispatch.runner.gate.pending:
                await anyio.sleep(0.01)
        # (no await from here to the checks: the policy's own tick cannot run between)
        assert dispatch.quiet_for() == 0.0
        young = [{"n": i} for i in range(2 * policy.young_batch)]  # pending, kept alive
        assert gc.get_count()[0] >= policy.young_batch
        assert policy.tend_once() is None  # the window is open: no pause now
        # nor an older or full collection (the policy's, or the collector's gap check),
        # though no other due time is near
        assert dispatch.next_deadline() is None
        assert not policy._gap()
        assert gc.get_count()[0] >= policy.young_batch
        await wait_events(kernel, "TaskSucceeded", where=lambda r: r.data["task"] == "p.job")
        assert ran
        # the burst has started: the window is closed, the young generation is collected
        with anyio.fail_after(30):
            while dispatch.runner.gate.pending or dispatch.quiet_for() < policy.young_gap:
                await anyio.sleep(0.01)
        young += [{"n": i} for i in range(2 * policy.young_batch)]
        assert policy.tend_once() is not None
        assert gc.get_count()[0] < policy.young_batch
        del young


async def test_the_young_generation_is_collected_before_it_grows_large(tmp_path: Path) -> None:
    async def work() -> None: ...

    kernel, service = make_kernel(tmp_path)
    async with kernel:
        await service.register("p", [spec(work, every="1h")])
        await _frozen(service)
        policy = service._gc
        threshold = gc.get_threshold()[0]  # CPython's own: raised to `overdue` x tended
        assert policy.young_batch < policy._young <= threshold
        before = sum(policy.collections)
        keep = []
        # allocations spread over loop turns (as runs make them): the tick collects them
        # in small passes, long before CPython's own threshold
        peak = 0
        with anyio.fail_after(60):
            while sum(policy.collections) < before + 3:
                keep.append([{"n": i} for i in range(500)])
                peak = max(peak, gc.get_count()[0])
                await anyio.sleep(0.002)
        # (the tended threshold: CPython's default would be 700; the policy's pauses
        # are those of `young_batch` objects, not of 10,000)
        assert peak < policy._young, (peak, policy._young, threshold)
        del keep


async def test_an_outcome_waits_while_a_burst_waits_for_its_instant(tmp_path: Path) -> None:
    """A run's outcome is not committed (nor folded) while runs claimed ahead wait in the
    start gate: it goes once they are released (the bound is raised here so that the
    order, not a duration, is what the test sees)."""
    kernel, service = make_kernel(tmp_path, max_lead_ms=LEAD_MS)
    ran: dict[str, float] = {}

    async def first() -> None:
        ran["first"] = time.time()

    async def second() -> None:
        ran["second"] = time.time()

    async with kernel:
        outcomes = service._runner.outcomes
        assert outcomes is not None
        outcomes.yield_to_starts = 120.0
        await service.register(
            "p",
            [spec(first, name="first", at=_at(6)), spec(second, name="second", at=_at(9))],
        )
        # "second" is claimed (a lead ahead) before "first" runs, and waits in the gate
        await wait_events(kernel, "TaskStarted", 2, timeout=60)
        (done,) = await wait_events(
            kernel, "TaskSucceeded", where=lambda r: r.data["task"] == "p.first", timeout=60
        )
        assert "second" in ran, "the first outcome was committed before the burst started"
        assert ran["first"] < ran["second"] <= done.timestamp


async def test_the_waves_of_a_burst_beyond_the_global_limit_are_a_start_window(
    tmp_path: Path,
) -> None:
    """Runs due together beyond ``max_concurrency`` start one wave per slot given back:
    no young collection between two waves; a line that does not move (slow runs hold
    every slot) does not hold collections back."""
    import asyncio

    kernel, service = make_kernel(tmp_path, max_concurrency=1)
    gate = asyncio.Event()
    started: list[float] = []

    async def hold() -> None:
        started.append(time.time())
        await gate.wait()

    async with kernel:
        await service.register(
            "p", [spec(hold, name="a", at=_at(3)), spec(hold, name="b", at=_at(3))]
        )
        await _frozen(service)
        runner, dispatch = service._runner, service._dispatch
        with anyio.fail_after(30):
            while not (started and runner.slots.waiting):  # one runs, one waits its slot
                await anyio.sleep(0.01)
        runner.released_at = time.perf_counter() - 60  # the line has not moved for a minute
        assert dispatch.quiet_for() > 0
        runner.released_at = time.perf_counter()  # a slot was just given back: a wave
        assert dispatch.quiet_for() == 0.0
        gate.set()
        await wait_events(kernel, "TaskSucceeded", 2)


async def test_an_idle_scheduler_s_gc_tick_sleeps_until_allocations_or_a_window_come(
    tmp_path: Path,
) -> None:
    """Nothing due for an hour and nothing allocating: the tick sleeps ``idle_tick``
    instead of waking every 10 ms (1.5 % of a core on an idle server), CPython collecting
    meanwhile at ``young_batch`` (passes as small as the tick's); allocations wake it
    back to its 10 ms tick, whose passes are the policy's."""

    async def work() -> None: ...

    kernel, service = make_kernel(tmp_path)
    async with kernel:
        await service.register("p", [spec(work, every="1h")])
        await _frozen(service, idle=True)
        policy = service._gc
        with anyio.fail_after(30):
            while not policy.idle:
                await anyio.sleep(0.05)
        assert gc.get_threshold()[0] == policy.young_batch
        before = sum(policy.collections)
        keep = []
        with anyio.fail_after(60):
            while policy.idle or sum(policy.collections) < before + 2:
                keep.append([{"n": i} for i in range(500)])
                await anyio.sleep(0.002)
        assert gc.get_threshold()[0] == policy.overdue * policy._young
        del keep
        # and idle again once the allocations stop
        with anyio.fail_after(30):
            while not policy.idle:
                await anyio.sleep(0.05)
