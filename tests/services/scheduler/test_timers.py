"""The precise start gate (the heap timer is exercised through the service tests)."""

from __future__ import annotations

import asyncio
import time

import anyio
import pytest

from services.scheduler.timers import StartGate


async def test_waiters_of_one_instant_resume_together_never_early() -> None:
    gate = StartGate()
    gate.handoff = 0.005  # the thread wakes the loop well before: the loop finishes the wait
    # far enough ahead that all ten begin waiting before it, even on a loaded machine (a
    # waiter that begins after its instant returns at once, out of the group's order)
    when = time.time() + 0.5
    order: list[tuple[int, float]] = []

    async def waiter(i: int) -> None:
        await gate.wait_until(when)
        order.append((i, time.time()))

    try:
        with anyio.fail_after(5):
            await asyncio.gather(*(waiter(i) for i in range(10)))
    finally:
        gate.close()
    assert [i for i, _ in order] == list(range(10))  # in the order they started waiting
    assert all(t >= when for _, t in order)  # nobody starts before the instant
    assert not gate._groups  # the instant's group is gone once released


async def test_a_cancelled_waiter_does_not_disturb_the_others() -> None:
    gate = StartGate()
    when = time.time() + 0.05
    done: list[str] = []

    async def waiter(name: str) -> None:
        await gate.wait_until(when)
        done.append(name)

    try:
        with anyio.fail_after(5):
            a = asyncio.create_task(waiter("a"))
            b = asyncio.create_task(waiter("b"))
            await asyncio.sleep(0)
            a.cancel()
            await asyncio.gather(a, b, return_exceptions=True)
    finally:
        gate.close()
    assert a.cancelled()
    assert done == ["b"]


async def test_instants_in_the_past_and_close_to_now() -> None:
    gate = StartGate()
    try:
        with anyio.fail_after(5):
            await gate.wait_until(time.time() - 1)  # returns at once
            soon = time.time() + gate.handoff / 2  # shorter than the hand-off: no thread
            await gate.wait_until(soon)
            assert time.time() >= soon
            later = time.time() + 0.01  # through the helper thread
            await gate.wait_until(later)
            assert time.time() >= later
    finally:
        gate.close()


async def test_close_while_the_helper_thread_sleeps() -> None:
    gate = StartGate()
    # A wide margin, so the helper thread takes over even when this shared machine
    # wakes the loop late (with the 2 ms default, a loop 1.6 ms late skips the thread).
    gate.margin = 0.15
    when = time.time() + 0.3
    task = asyncio.create_task(gate.wait_until(when))
    with anyio.fail_after(5):
        while gate._thread is None:  # the coarse wait ends `margin` before the instant
            assert not task.done(), "the gate skipped its helper thread"
            await asyncio.sleep(0.005)
    gate.close()  # does not block; the thread finishes its sleep and wakes the loop
    with anyio.fail_after(5):
        await task
    assert time.time() >= when


async def test_close_cancels_the_pending_coarse_waits() -> None:
    gate = StartGate()
    loop = asyncio.get_running_loop()
    when = time.time() + 30  # its coarse wait is far from over
    task = asyncio.create_task(gate.wait_until(when))
    await asyncio.sleep(0)
    assert gate._handles
    gate.close()
    with anyio.fail_after(5):
        await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()  # its waiter is not left hanging
    assert not gate._handles and not gate._groups
    gate._hand_off(loop, time.time() + 1)  # a late wake-up starts no new thread
    assert gate._thread is None
    with pytest.raises(RuntimeError, match="start gate is closed"):
        await gate.wait_until(time.time() + 1)


async def test_a_wall_clock_stepped_back_during_the_last_wait_is_waited_out_idle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The instant is a wall-clock one: a clock stepped back 3 s while the helper thread
    # sleeps the last part of the wait moves it 3 s away again. The gate waits them out
    # asleep (on the loop), not in a busy loop of the event loop for the whole step.
    real = time.time
    step = [0.0]
    monkeypatch.setattr(time, "time", lambda: real() + step[0])  # the system clock
    gate = StartGate()
    gate.margin = 0.3  # the helper thread's part of the wait: long enough to step in
    when = time.time() + 0.6

    async def step_back() -> None:
        await asyncio.sleep(0.45)  # the coarse wait is over, the thread sleeps
        step[0] = -3.0

    stepper = asyncio.create_task(step_back())
    cpu = time.process_time()
    try:
        with anyio.fail_after(30):
            await gate.wait_until(when)
    finally:
        gate.close()
        await stepper
    assert time.time() >= when  # never early, in the clock's new time
    # a busy loop spends most of the 3 s on the CPU (1.4 s measured on a loaded
    # machine); waiting asleep, next to nothing
    assert time.process_time() - cpu < 0.5


async def test_idle_returns_when_the_instant_is_released_and_keeps_no_waiter() -> None:
    """``StartGate.idle`` (what an outcome batch waits on) returns once the runs waiting
    for an instant are released, or at its bound; a gate never idle (instants back to
    back) does not pile up the waiters of the bounded waits."""
    gate = StartGate()
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(gate.wait_until, time.time() + 3600)  # pending for an hour
            while not gate.pending:
                await anyio.sleep(0.001)
            for _ in range(5):
                await gate.idle(0.001)  # bounded: returns with the gate still pending
            assert gate.pending and not gate._idlers
            tg.cancel_scope.cancel()
    gate.close()
    gate2 = StartGate()
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            when = time.time() + 0.2
            tg.start_soon(gate2.wait_until, when)
            while not gate2.pending:
                await anyio.sleep(0.001)
            await gate2.idle(60)  # returns at the release, not after its bound
            assert time.time() >= when and not gate2.pending
    gate2.close()
