"""A task waiting on the store stops when it is cancelled, whatever else happens at
that moment.

On Python 3.11 ``asyncio.wait_for`` swallows a cancellation that arrives as the thing
it waits for completes: the waiter returned as if woken, and a loop around it never
ended (closing a PostgreSQL store hung in the follower's probe). These tests make the
two events coincide on purpose: the wake-up is scheduled, then the cancellation."""

from __future__ import annotations

import asyncio

import anyio

from kernel.store.tail import Tail


async def test_a_tail_waiter_cancelled_as_a_commit_wakes_it_is_cancelled() -> None:
    tail = Tail()
    with anyio.fail_after(30):
        waiter = asyncio.ensure_future(tail.wait(0, timeout=60))
        await asyncio.sleep(0)  # it waits now
        row = (1, "s", 1, "T", 1, b"{}", b"{}", 0.0)
        tail.push([row])  # the wake-up is scheduled...
        waiter.cancel()  # ...and the cancellation right after it
        await asyncio.wait([waiter])
        assert waiter.cancelled()
