"""In a cluster, a node that claimed a run ahead of its instant and died comes back
before the instant: it releases its claim, and the instant runs once in the cluster
(the new claim's key is derived from the released one on every node)."""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime
from typing import Any, cast

import anyio
import pytest

from kernel import Kernel
from kernel.events import Meta, NewEvent
from kernel.sdk import current_task, task
from kernel.store.postgres import PostgresStore
from services.cluster.service import ClusterService
from services.scheduler.claim import claim_key
from services.scheduler.events import TaskScheduled, TaskStarted
from services.scheduler.service import SchedulerService
from services.scheduler.specs import CompiledTask
from services.scheduler.triggers import DateTrigger
from tests.services.cluster.test_membership import node_settings

pytestmark = pytest.mark.postgres

#: room for two kernels to boot on a loaded machine before the instant
AHEAD_S = 8.0


async def plant_a_claim_ahead(dsn: str, at: float) -> str:
    """Node 'a' (boot a0) scheduled p.once at ``at`` and claimed it ahead, then died."""
    trigger = DateTrigger(at)
    key = claim_key(cast(CompiledTask, _Task("p.once", trigger)), at, 1, None)
    store = PostgresStore(dsn)
    await store.open()
    meta = Meta(node="a", boot="a0")
    scheduled = TaskScheduled(
        task="p.once", plugin="p", generation=0, trigger=trigger.description, next_run=at
    )
    await store.append([NewEvent.of(scheduled, meta)], stream="task-p.once")
    started = TaskStarted(task="p.once", run_id="r1", scheduled_for=at, trigger="schedule")
    await store.append(
        [NewEvent.of(started, Meta(node="a", boot="a0", id=key), explicit_id=True)],
        stream="task-p.once",
    )
    await store.close()
    return key


class _Task:
    def __init__(self, id: str, trigger: Any) -> None:
        self.id, self.trigger = id, trigger


async def test_a_node_back_before_the_instant_releases_its_claim_and_it_runs_once(
    pg_dsn: str,
) -> None:
    at = time.time() + AHEAD_S
    key = await plant_a_claim_ahead(pg_dsn, at)
    ran: list[str] = []

    @task(at=datetime.fromtimestamp(at, UTC))
    async def once() -> None:
        ran.append(current_task().run_id)

    spec = once.__xcore_task__  # type: ignore[attr-defined]
    schedulers = [SchedulerService(), SchedulerService()]
    clusters = [ClusterService(), ClusterService()]
    async with (
        Kernel(node_settings(pg_dsn, "a"), services=[clusters[0], schedulers[0]]) as a,
        Kernel(node_settings(pg_dsn, "b"), services=[clusters[1], schedulers[1]]),
    ):
        assert time.time() < at, "the machine is too slow for this test's margin"
        for scheduler in schedulers:
            await scheduler.register("p", [spec])
        with anyio.fail_after(AHEAD_S + 60):
            while not await a.read(types=["TaskSucceeded"]):
                await anyio.sleep(0.05)
        await anyio.sleep(1.5)  # the other node had time to run it too
        events = await a.read(stream="task-p.once")
        for cluster in clusters:  # the released run is no longer held by node a
            nodes = {n["node"]: n for n in cluster.describe()["nodes"]}
            assert nodes["a"]["runs"] == [] and nodes["a"]["state"] != "lost"
    types = [r.type for r in events]
    assert "TaskFailed" not in types, types
    released = [r for r in events if r.type == "TaskReleased"]
    assert [(r.data["run_id"], r.data["claim"], r.meta.node) for r in released] == [
        ("r1", key, "a")
    ]
    starts = [r for r in events if r.type == "TaskStarted"]
    assert len(starts) == 2 and starts[1].meta.id != key
    assert types.count("TaskSucceeded") == 1 and len(ran) == 1
    assert ran == [starts[1].data["run_id"]]


def _first_for(node: str, other: str) -> str:
    """A task name whose id ``node`` ranks before ``other`` for (the placement's hash)."""
    for i in range(1000):
        tid = f"p.once{i}"

        def score(n: str, tid: str = tid) -> bytes:
            return hashlib.blake2b(f"{tid}\0{n}".encode(), digest_size=8).digest()

        if score(node) > score(other):
            return f"once{i}"
    raise AssertionError("no task name ranks the node first")


async def test_a_node_stopped_gracefully_after_its_claim_hands_the_instant_to_the_others(
    pg_dsn: str,
) -> None:
    """Before: a node stopped (SIGTERM, a deploy) between its early claim and the
    instant recorded the run ``TaskFailed(kind="cancelled")``; its claim key stayed
    taken, so no other node could claim the instant: it ran nowhere although its code
    never ran. Now the claim is released at the stop and another node runs it once."""
    at = time.time() + AHEAD_S
    name = _first_for("a", "b")
    ran: list[str] = []

    @task(name=name, at=datetime.fromtimestamp(at, UTC))
    async def once() -> None:
        ran.append(current_task().run_id)

    spec = once.__xcore_task__  # type: ignore[attr-defined]
    tid = f"p.{name}"
    base = node_settings(pg_dsn, "a")
    ahead = base.model_copy(
        update={"services": {**base.services, "scheduler": {"max_lead_ms": 60_000.0}}}
    )
    b_scheduler = SchedulerService()
    async with Kernel(node_settings(pg_dsn, "b"), services=[ClusterService(), b_scheduler]) as b:
        a_scheduler = SchedulerService()
        async with Kernel(ahead, services=[ClusterService(), a_scheduler]) as a:
            await b_scheduler.register("p", [spec])
            await a_scheduler.register("p", [spec])
            with anyio.fail_after(30):  # node a, first for the task, claims a lead ahead
                while not await a.read(stream=f"task-{tid}", types=["TaskStarted"]):
                    await anyio.sleep(0.05)
        assert not ran and time.time() < at, "the machine is too slow for this test's margin"
        with anyio.fail_after(AHEAD_S + 60):
            while not await b.read(stream=f"task-{tid}", types=["TaskSucceeded"]):
                await anyio.sleep(0.05)
        await anyio.sleep(1.0)  # nothing more comes
        events = await b.read(stream=f"task-{tid}")
    types = [r.type for r in events]
    assert "TaskFailed" not in types, types
    starts = [r for r in events if r.type == "TaskStarted"]
    released = [r for r in events if r.type == "TaskReleased"]
    assert [r.meta.node for r in starts] == ["a", "b"]
    assert [(r.data["claim"], r.meta.node) for r in released] == [(starts[0].meta.id, "a")]
    assert types.count("TaskSucceeded") == 1 and ran == [starts[1].data["run_id"]]


async def test_a_claim_released_at_a_stop_is_run_by_a_node_that_had_seen_it_claimed(
    pg_dsn: str,
) -> None:
    """Both nodes claim a long lead ahead (the same settings): node b's timer for the
    instant fired at once, saw node a's claim and gave the instant up. Before: node a
    stopping gracefully seconds later (a release) changed nothing for node b, and the
    instant ran nowhere. Now node b arms the released instant again and runs it once."""
    at = time.time() + 14.0
    name = _first_for("a", "b")
    ran: list[str] = []

    @task(name=name, at=datetime.fromtimestamp(at, UTC))
    async def once() -> None:
        ran.append(current_task().run_id)

    spec = once.__xcore_task__  # type: ignore[attr-defined]
    tid = f"p.{name}"

    def settings(node: str) -> Any:
        base = node_settings(pg_dsn, node)
        scheduler = {"max_lead_ms": 60_000.0}
        return base.model_copy(update={"services": {**base.services, "scheduler": scheduler}})

    b_scheduler = SchedulerService()
    async with Kernel(settings("b"), services=[ClusterService(), b_scheduler]) as b:
        a_scheduler = SchedulerService()
        async with Kernel(settings("a"), services=[ClusterService(), a_scheduler]) as a:
            await a_scheduler.register("p", [spec])
            await b_scheduler.register("p", [spec])
            with anyio.fail_after(30):  # node a, first for the task, claims a lead ahead
                while not await a.read(stream=f"task-{tid}", types=["TaskStarted"]):
                    await anyio.sleep(0.05)
            await anyio.sleep(4.0)  # node b's takeover of the instant saw the claim
        assert not ran and time.time() < at, "the machine is too slow for this test's margin"
        with anyio.fail_after(20 + 60):
            while not await b.read(stream=f"task-{tid}", types=["TaskSucceeded"]):
                await anyio.sleep(0.05)
        await anyio.sleep(1.0)  # nothing more comes
        events = await b.read(stream=f"task-{tid}")
    types = [r.type for r in events]
    assert "TaskFailed" not in types and "TaskSkipped" not in types, types
    starts = [r for r in events if r.type == "TaskStarted"]
    assert [r.meta.node for r in starts] == ["a", "b"]
    assert types.count("TaskReleased") == 1 and types.count("TaskSucceeded") == 1
    assert ran == [starts[1].data["run_id"]]
