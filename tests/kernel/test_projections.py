"""Projections: fold, snapshots, rebuild, and state at a past position."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

import anyio
import pytest

from kernel import Kernel, Projection, Recorded, Settings, handles, state_at
from kernel.events import Event, NewEvent
from kernel.projections import fold
from kernel.store import SQLiteStore


class Deposited(Event):
    account: str
    amount: int


class Withdrawn(Event):
    account: str
    amount: int


class Balances(Projection):
    name = "balances"
    snapshot_every = 10

    def reset(self) -> None:
        self.balances: dict[str, int] = {}
        self.applied = 0

    @handles(Deposited)
    def _deposit(self, r: Recorded) -> None:
        self.balances[r.data["account"]] = (
            self.balances.get(r.data["account"], 0) + r.data["amount"]
        )
        self.applied += 1

    @handles(Withdrawn)
    def _withdraw(self, r: Recorded) -> None:
        self.balances[r.data["account"]] -= r.data["amount"]
        self.applied += 1

    def snapshot(self) -> Any:
        return {"balances": self.balances}

    def restore(self, state: Any) -> None:
        self.balances = dict(state["balances"])


async def seed(kernel: Kernel, n: int) -> None:
    for i in range(n):
        await kernel.append(Deposited(account=f"a{i % 3}", amount=10), stream=f"acct-a{i % 3}")
    await kernel.append(Withdrawn(account="a0", amount=5), stream="acct-a0")


def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, node="test")


async def test_a_projection_catches_up_then_follows_live(tmp_path: Path) -> None:
    async with Kernel(settings(tmp_path), services=[]) as kernel:
        await seed(kernel, 9)
        p = await kernel.add_projection(Balances())
        assert p.balances == {"a0": 25, "a1": 30, "a2": 30}
        await kernel.append(Deposited(account="a9", amount=1), stream="acct-a9")
        with anyio.fail_after(5):
            await kernel.settle()
        assert p.balances["a9"] == 1
        assert kernel.projection(Balances) is p
        assert Balances.types() == {"Deposited", "Withdrawn"}


async def test_a_snapshot_is_saved_and_used_at_the_next_start(tmp_path: Path) -> None:
    async with Kernel(settings(tmp_path), services=[]) as kernel:
        await seed(kernel, 30)
        p = await kernel.add_projection(Balances())
        assert p.applied == 31
    # stop saved a snapshot at the last position; a new process folds only what follows
    async with Kernel(settings(tmp_path), services=[]) as kernel:
        snap = await kernel.store.load_snapshot("balances")
        assert snap is not None
        await kernel.append(Deposited(account="a1", amount=1), stream="acct-a1")
        p = await kernel.add_projection(Balances())
        assert p.applied == 1  # only the new event was folded
        assert p.balances == {"a0": 95, "a1": 101, "a2": 100}


async def test_a_snapshot_of_an_older_schema_is_ignored(tmp_path: Path) -> None:
    async with Kernel(settings(tmp_path), services=[]) as kernel:
        await seed(kernel, 12)
        await kernel.add_projection(Balances())

    class BalancesV2(Balances):
        name = "balances"
        schema = 2

    async with Kernel(settings(tmp_path), services=[]) as kernel:
        p = await kernel.add_projection(BalancesV2())
        assert p.applied == 13  # rebuilt from zero


async def test_rebuild_folds_the_whole_log_again(tmp_path: Path) -> None:
    async with Kernel(settings(tmp_path), services=[]) as kernel:
        await seed(kernel, 5)
        p = await kernel.add_projection(Balances())
        p.balances["a0"] = -999  # a damaged state
        await kernel.projector("balances").rebuild()
        assert p.balances == {"a0": 15, "a1": 20, "a2": 10}
        assert p.applied == 6


async def test_state_at_a_past_position(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "log.db")
    await store.open()
    for i in range(1, 6):
        await store.append([NewEvent.of(Deposited(account="a", amount=i))], stream="acct-a")
    past = await state_at(store, Balances, 3)
    now = await state_at(store, Balances, 5)
    await store.close()
    assert past.balances == {"a": 1 + 2 + 3}
    assert past.position == 3
    assert now.balances == {"a": 15}


class Counter(Projection):
    """Remembers every position it folded; saves a snapshot after every batch, so the
    fold awaits the writer between a read and the next (where appends slip in)."""

    name = "counter"
    snapshot_every = 1

    def reset(self) -> None:
        self.seen: list[int] = []

    @handles(Deposited)
    def _deposit(self, r: Recorded) -> None:
        self.seen.append(r.position)

    def snapshot(self) -> Any:
        return {"n": len(self.seen)}


async def test_projections_added_and_rebuilt_under_concurrent_appends_miss_nothing(
    tmp_path: Path,
) -> None:
    """fold takes the log's bound before each read: events appended while a projection
    catches up (or rebuilds) are folded, none skipped, none twice."""
    async with Kernel(settings(tmp_path), services=[]) as kernel:
        stop = asyncio.Event()

        async def producer(i: int) -> None:
            while not stop.is_set():
                await kernel.append(Deposited(account=f"p{i}", amount=1), stream=f"acct-p{i}")

        await seed(kernel, 200)
        producers = [asyncio.create_task(producer(i)) for i in range(50)]
        try:
            counters = []
            for trial in range(6):

                class Trial(Counter):
                    name = f"counter-{trial}"

                counters.append(await kernel.add_projection(Trial()))
                await asyncio.sleep(0)
            rebuilt = counters[0]
            await kernel.projector(rebuilt.name).rebuild()
            for _ in range(20):
                await asyncio.sleep(0)
        finally:
            stop.set()
            await asyncio.gather(*producers)
        with anyio.fail_after(30):
            await kernel.settle()
        expected = [r.position for r in await kernel.read(types=["Deposited"])]
        for c in counters:
            assert c.seen == expected, f"{c.name}: {len(c.seen)} folded of {len(expected)}"


async def test_state_at_under_concurrent_appends_is_exact(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "log.db")
    await store.open()
    try:
        for _ in range(100):
            await store.append([NewEvent.of(Deposited(account="a", amount=1))], stream="a")
        stop = asyncio.Event()

        async def producer() -> None:
            while not stop.is_set():
                await store.append([NewEvent.of(Deposited(account="b", amount=1))], stream="b")

        task = asyncio.create_task(producer())
        try:
            for _ in range(5):
                p = await state_at(store, Balances, 100)
                assert p.balances == {"a": 100} and p.position == 100
        finally:
            stop.set()
            await task
    finally:
        await store.close()


async def test_snapshots_are_saved_every_n_events_while_running(tmp_path: Path) -> None:
    async with Kernel(settings(tmp_path), services=[]) as kernel:
        await kernel.add_projection(Balances())  # snapshot_every = 10
        for _ in range(25):
            await kernel.append(Deposited(account="a", amount=1), stream="acct-a")
        with anyio.fail_after(10):
            await kernel.settle()
        snap = await kernel.store.load_snapshot("balances")
        # saved while live, not only at stop
        assert snap is not None and snap.position >= 20


class Unsaveable(Balances):
    name = "unsaveable"
    snapshot_every = 1

    def snapshot(self) -> Any:
        return {"balances": self.balances, "bad": {1, 2}}  # orjson refuses a set


async def test_a_failing_snapshot_never_applies_an_event_twice(tmp_path: Path) -> None:
    async with Kernel(settings(tmp_path), services=[]) as kernel:
        p = await kernel.add_projection(Unsaveable())
        for _ in range(5):
            await kernel.append(Deposited(account="a", amount=10), stream="acct-a")
        with anyio.fail_after(10):
            await kernel.settle()
        assert p.balances == {"a": 50}
        assert p.applied == 5
        assert await kernel.store.load_snapshot("unsaveable") is None


class _GcWatcher(Projection):
    name = "gc-watcher"

    def reset(self) -> None:
        self.enabled_during: list[bool] = []
        self.fail_at: int | None = None

    @handles("Counted")
    def _counted(self, r: Recorded) -> None:
        self.enabled_during.append(gc.isenabled())
        if self.fail_at is not None and r.position >= self.fail_at:
            raise RuntimeError("a handler failed")


async def test_a_fold_pauses_the_cyclic_gc_and_always_restores_it(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "log.db")
    await store.open()
    try:
        await store.append([NewEvent.raw("Counted", {"n": i}) for i in range(10)], stream="c")
        assert gc.isenabled()
        watcher = _GcWatcher()
        await fold(store, watcher, batch_size=3)
        assert watcher.enabled_during == [False] * 10
        assert gc.isenabled()

        failing = _GcWatcher()
        failing.fail_at = 5
        with pytest.raises(RuntimeError):
            await fold(store, failing)
        assert gc.isenabled()

        gc.disable()  # an application that runs without the collector keeps it off
        try:
            await fold(store, _GcWatcher())
            assert not gc.isenabled()
        finally:
            gc.enable()
    finally:
        await store.close()


class _Once(Projection):
    name = "once"

    def reset(self) -> None:
        self.applied: list[int] = []
        self.fail_at: int | None = None

    @handles("Counted")
    def _counted(self, r: Recorded) -> None:
        if r.position == self.fail_at:
            self.fail_at = None
            raise RuntimeError("a handler failed once")
        self.applied.append(r.position)


async def test_a_fold_run_again_after_a_handler_failed_applies_no_event_twice(
    tmp_path: Path,
) -> None:
    store = SQLiteStore(tmp_path / "log.db")
    await store.open()
    try:
        await store.append([NewEvent.raw("Counted", {"n": i}) for i in range(10)], stream="c")
        p = _Once()
        p.fail_at = 6
        with pytest.raises(RuntimeError):
            await fold(store, p, batch_size=4)
        # what was applied before the failure is what the position says
        assert p.applied == [1, 2, 3, 4, 5]
        assert p.position == 5
        await fold(store, p, batch_size=4)
        assert p.applied == list(range(1, 11))
    finally:
        await store.close()
