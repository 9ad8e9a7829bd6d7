"""The global limit's line: priority first, then due time; waiters counted exactly."""

from __future__ import annotations

import asyncio

import anyio

from services.scheduler.limits import PrioritySlots


async def test_waiters_are_counted_through_grants_and_cancels() -> None:
    slots = PrioritySlots(2)
    order: list[str] = []

    async def take(name: str, priority: int, due: float) -> None:
        await slots.acquire(priority, due)
        order.append(name)

    with anyio.fail_after(10):
        await take("a", 0, 0.0)
        await take("b", 0, 0.0)
        assert slots.busy == 2 and slots.waiting == 0 and not slots.free
        late = asyncio.create_task(take("late", 0, 5.0))
        urgent = asyncio.create_task(take("urgent", 9, 9.0))
        early = asyncio.create_task(take("early", 0, 1.0))
        gone = asyncio.create_task(take("gone", 0, 0.5))
        await asyncio.sleep(0)
        assert slots.waiting == 4
        gone.cancel()  # a waiter cancelled: no longer counted, never granted
        await asyncio.gather(gone, return_exceptions=True)
        assert slots.waiting == 3
        slots.release()  # granted to the highest priority, counted out at once
        assert slots.waiting == 2 and slots.busy == 2
        slots.release()  # the next: same priority, earlier due time
        await asyncio.gather(urgent, early)
        assert slots.waiting == 1
        # granted and cancelled in the same step: the slot is handed on, not lost
        slots.release()
        late.cancel()
        await asyncio.gather(late, return_exceptions=True)
        assert slots.waiting == 0
        assert order == ["a", "b", "urgent", "early"]
        assert slots.busy == 1  # "late" handed its slot back
        slots.release()
        assert slots.busy == 0 and slots.free


async def test_the_runs_that_gave_a_slot_back_wait_for_the_line_together() -> None:
    """``line_moved``: done once no run waits for a slot, or after ``steps`` loop steps,
    for every caller at once (one check per loop step, not one task step per caller);
    a caller cancelled leaves the others waiting."""
    slots = PrioritySlots(1)
    with anyio.fail_after(10):
        assert slots.line_moved(8) is None  # nobody waits: nothing to wait for
        await slots.acquire(0, 0.0)
        waiter = asyncio.create_task(slots.acquire(0, 1.0))
        await asyncio.sleep(0)
        assert slots.waiting == 1
        movers = [slots.line_moved(8) for _ in range(30)]
        assert all(m is not None and not m.done() for m in movers)
        gone = movers.pop()
        assert gone is not None
        gone.cancel()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert not any(m is not None and m.done() for m in movers)
        slots.release()  # the waiting run has its slot: the line moved
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert all(m is not None and m.done() and not m.cancelled() for m in movers)
        await waiter
        # a line that does not move: the callers are woken after the bound, together
        blocked = asyncio.create_task(slots.acquire(0, 2.0))
        await asyncio.sleep(0)
        bounded = [slots.line_moved(5) for _ in range(10)]
        steps = 0
        while steps < 8:
            await asyncio.sleep(0)
            steps += 1
            done = [m is not None and m.done() for m in bounded]
            assert all(done) or not any(done)
            if all(done):
                break
        assert all(done) and 3 <= steps <= 6, steps
        assert slots.waiting == 1  # still in line: only the bound woke them
        blocked.cancel()
        await asyncio.gather(blocked, return_exceptions=True)
