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
