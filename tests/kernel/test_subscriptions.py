"""Subscriptions: catch-up then live, checkpoints, retries and dead letters, bounded memory."""

from __future__ import annotations

import asyncio
from pathlib import Path

import anyio
import pytest

from kernel import Kernel, Recorded, RetryPolicy, Settings
from kernel.events import NewEvent
from kernel.store import SQLiteStore
from kernel.subscriptions import Subscription


def ev(i: int) -> NewEvent:
    return NewEvent.raw("Counted", {"i": i})


async def test_catch_up_then_live_in_order_without_gaps(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "log.db")
    await store.open()
    await store.append([ev(i) for i in range(1, 6)], stream="s")
    seen: list[int] = []
    sub = Subscription(store, lambda r: seen.append(r.data["i"]), start=0, batch_size=2)
    await sub.start()
    with anyio.fail_after(5):
        await sub.caught_up.wait()
        for i in range(6, 11):
            await store.append([ev(i)], stream="s")
        await sub.wait_for(10)
    await sub.stop()
    await store.close()
    assert seen == list(range(1, 11))


async def test_start_now_skips_history_and_types_filter(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "log.db")
    await store.open()
    await store.append([ev(1)], stream="s")
    seen: list[Recorded] = []
    sub = Subscription(store, seen.append, start="now", types=["Counted"])
    await sub.start()
    await store.append([NewEvent.raw("Other", {}), ev(2)], stream="s")
    with anyio.fail_after(5):
        await sub.wait_for(3)
    await sub.stop()
    await store.close()
    assert [(r.type, r.data["i"]) for r in seen] == [("Counted", 2)]


async def test_a_named_subscription_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    store = SQLiteStore(path)
    await store.open()
    await store.append([ev(i) for i in range(1, 4)], stream="s")
    first: list[int] = []
    sub = Subscription(store, lambda r: first.append(r.data["i"]), name="audit", start="checkpoint")
    await sub.start()
    with anyio.fail_after(5):
        await sub.wait_for(3)
    await sub.stop()  # saves the checkpoint
    await store.append([ev(4), ev(5)], stream="s")
    await store.close()

    store = SQLiteStore(path)
    await store.open()
    assert await store.load_checkpoint("audit") == 3
    second: list[int] = []
    sub = Subscription(
        store, lambda r: second.append(r.data["i"]), name="audit", start="checkpoint"
    )
    await sub.start()
    with anyio.fail_after(5):
        await sub.wait_for(5)
    await sub.stop()
    await store.close()
    assert first == [1, 2, 3]
    assert second == [4, 5]


def test_a_checkpoint_start_needs_a_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a name"):
        Subscription(SQLiteStore(tmp_path / "x.db"), print, start="checkpoint")


async def test_a_slow_subscriber_falls_back_to_the_store_and_misses_nothing(tmp_path: Path) -> None:
    """The in-memory tail holds a bounded number of events; a subscriber further behind
    reads from the file instead, so memory does not grow with its lag."""
    store = SQLiteStore(tmp_path / "log.db", tail_size=64)
    await store.open()
    seen: list[int] = []
    gate = asyncio.Event()

    async def slow(r: Recorded) -> None:
        await gate.wait()
        seen.append(r.data["i"])

    sub = Subscription(store, slow, start=0, batch_size=50)
    await sub.start()
    for chunk in range(20):
        await store.append([ev(chunk * 100 + i) for i in range(100)], stream="s")
    assert len(store._tail._rows) == 64  # bounded, however far behind the subscriber is
    gate.set()
    with anyio.fail_after(20):
        await sub.wait_for(2000)
    await sub.stop()
    await store.close()
    assert seen == list(range(2000))


async def test_a_failing_handler_is_retried_then_recorded_as_subscriber_failed(
    tmp_path: Path,
) -> None:
    settings = Settings(data_dir=tmp_path, node="test")
    async with Kernel(settings, services=[]) as kernel:
        attempts: list[int] = []
        handled: list[int] = []

        def flaky(r: Recorded) -> None:
            if r.data["i"] == 2:
                attempts.append(r.position)
                raise ValueError("cannot handle two")
            handled.append(r.data["i"])

        await kernel.subscribe(
            flaky,
            name="flaky",
            start=0,
            types=["Counted"],
            retry=RetryPolicy(max_attempts=3, first_delay=0.001),
        )
        await kernel.append([ev(1), ev(2), ev(3)], stream="s")
        with anyio.fail_after(10):
            while not await kernel.read(types=["SubscriberFailed"]):
                await asyncio.sleep(0.01)
            while handled != [1, 3]:
                await asyncio.sleep(0.01)
        [failed] = await kernel.read(types=["SubscriberFailed"])
        assert failed.data["subscriber"] == "flaky"
        assert failed.data["event_type"] == "Counted"
        assert failed.data["attempts"] == 3
        assert "ValueError: cannot handle two" in failed.data["error"]
        assert "Traceback" in failed.data["traceback"]
        assert len(attempts) == 3
        # the dead letter points at the event that failed
        [bad] = [r for r in await kernel.read(types=["Counted"]) if r.data["i"] == 2]
        assert failed.data["position"] == bad.position
        assert failed.meta.causation_id == bad.meta.id


async def test_stop_lets_the_running_handler_finish(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "log.db")
    await store.open()
    entered = asyncio.Event()
    finished: list[int] = []

    async def slow(r: Recorded) -> None:
        entered.set()
        await asyncio.sleep(0.2)
        finished.append(r.position)

    sub = Subscription(store, slow, name="slow", start=0)
    await sub.start()
    await store.append([ev(1), ev(2)], stream="s")
    with anyio.fail_after(10):
        await entered.wait()
        await sub.stop()
    assert finished == [1]  # the handler in progress completed; the next never started
    assert await store.load_checkpoint("slow") == 1
    await store.close()


async def test_stop_cancels_a_handler_that_outlives_the_grace(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "log.db")
    await store.open()
    entered = asyncio.Event()

    async def stuck(r: Recorded) -> None:
        entered.set()
        await asyncio.Event().wait()

    sub = Subscription(store, stuck, name="stuck", start=0)
    await sub.start()
    await store.append([ev(1)], stream="s")
    with anyio.fail_after(10):
        await entered.wait()
        await sub.stop(grace=0.05)
    assert await store.load_checkpoint("stuck") is None  # delivered again next time
    await store.close()


async def test_a_subscription_on_a_read_only_store_goes_live(tmp_path: Path) -> None:
    writer = SQLiteStore(tmp_path / "log.db")
    await writer.open()
    await writer.append([ev(1)], stream="s")
    reader = SQLiteStore(tmp_path / "log.db", readonly=True, poll_interval=0.01)
    await reader.open()
    seen: list[int] = []
    sub = Subscription(reader, lambda r: seen.append(r.data["i"]), start=0)
    await sub.start()
    try:
        with anyio.fail_after(20):
            await sub.caught_up.wait()
            await writer.append([ev(2)], stream="s")
            await sub.wait_for(2)
    finally:
        await sub.stop()
        await reader.close()
        await writer.close()
    assert seen == [1, 2]


async def test_a_running_subscription_saves_its_checkpoint_periodically(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "log.db")
    await store.open()
    sub = Subscription(store, lambda r: None, name="p", start=0, checkpoint_interval=0.05)
    await sub.start()
    try:
        for i in range(3):
            await store.append([ev(i)], stream="s")
            with anyio.fail_after(20):
                while await store.load_checkpoint("p") != i + 1:
                    await asyncio.sleep(0.01)
        assert sub.running  # saved while running, not only by stop()
    finally:
        await sub.stop()
        await store.close()
