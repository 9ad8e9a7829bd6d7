"""Nodes on one PostgreSQL log: heartbeats, a lost node recorded once, its runs failed."""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

import anyio
import pytest

from kernel import Kernel
from kernel.events import Meta, NewEvent, Recorded
from kernel.settings import Settings
from kernel.store.postgres import PostgresStore
from services.cluster.events import NodeStarted, node_stream
from services.cluster.placement import Rendezvous
from services.cluster.projection import ClusterView
from services.cluster.service import ClusterService
from services.scheduler.events import TaskStarted

pytestmark = pytest.mark.postgres


def node_settings(dsn: str, node: str) -> Settings:
    return Settings(
        store="postgres",
        dsn=dsn,
        node=node,
        services={"cluster": {"heartbeat_s": 0.2, "stale_after_s": 1.0}},
    )


async def plant_a_dead_node(dsn: str, stale_after: float = 1.0) -> None:
    """A node 'ghost' that started, claimed a run, and died long ago."""
    store = PostgresStore(dsn)
    await store.open()
    meta = {"node": "ghost", "boot": "g0"}
    started = NodeStarted(
        node="ghost",
        boot="g0",
        version="0",
        pid=1,
        host="h",
        port=1,
        heartbeat_s=0.2,
        stale_after_s=stale_after,
    )
    await store.append([NewEvent.of(started, Meta(**meta))], stream=node_stream("ghost"))
    run = TaskStarted(task="p.t", run_id="r1", scheduled_for=time.time())
    await store.append([NewEvent.of(run, Meta(**meta))], stream="task-p.t")
    await store.close()


async def test_a_dead_node_is_recorded_lost_once_and_its_runs_failed(pg_dsn: str) -> None:
    await plant_a_dead_node(pg_dsn)
    services = [ClusterService(), ClusterService()]
    async with (
        Kernel(node_settings(pg_dsn, "a"), services=[services[0]]) as a,
        Kernel(node_settings(pg_dsn, "b"), services=[services[1]]) as b,
    ):
        with anyio.fail_after(60):
            while not await a.read(types=["NodeLost"]):
                await anyio.sleep(0.05)
            await anyio.sleep(1.5)  # both survivors had time to try
            lost = await a.read(types=["NodeLost"])
            assert [r.data["node"] for r in lost] == ["ghost"]
            assert lost[0].data["by"] in ("a", "b")
            assert lost[0].data["runs_failed"] == ["r1"]
            failed = await a.read(types=["TaskFailed"])
            assert [(r.data["run_id"], r.data["kind"]) for r in failed] == [("r1", "node_lost")]
            assert "node lost: ghost" in failed[0].data["error"]
            await b.settle()
            view = services[1].describe()
            states = {n["node"]: n["state"] for n in view["nodes"]}
            assert states == {"ghost": "lost", "a": "up", "b": "up"}
            assert view["alive"] == ["a", "b"]
            ghost = next(n for n in view["nodes"] if n["node"] == "ghost")
            assert ghost["runs"] == []  # failed: no longer held
        await b.stop()
        with anyio.fail_after(30):
            # a node that stopped cleanly is not lost
            await anyio.sleep(1.5)
            assert [r.data["node"] for r in await a.read(types=["NodeLost"])] == ["ghost"]
            assert [r.data["node"] for r in await a.read(types=["NodeStopped"])] == ["b"]
            await a.settle()
            rows = {n["node"]: n for n in services[0].describe()["nodes"]}
            assert rows["b"]["state"] == "stopped"
            assert rows["a"]["last_heartbeat"] is not None


def test_tasks_spread_over_the_live_nodes() -> None:
    view = ClusterView()
    now = time.time()
    for name in ("a", "b", "c"):
        row = view.node(name)
        row.last_heartbeat = now
    first = Counter(Rendezvous(view, "a", 0.2).rank(f"task-{i}")[0] for i in range(300))
    assert set(first) == {"a", "b", "c"} and min(first.values()) > 50
    # every node agrees on the ranking, and the delays follow it
    for i in range(20):
        ranks = {n: Rendezvous(view, n, 0.2).rank(f"t{i}") for n in "abc"}
        assert ranks["a"] == ranks["b"] == ranks["c"]
        assert sorted(Rendezvous(view, n, 0.2).delay(f"t{i}") for n in "abc") == [0.0, 0.2, 0.4]
    # a stale node drops out of the ranking
    view.nodes["c"].last_heartbeat = now - 60
    assert "c" not in Rendezvous(view, "a", 0.2).rank("x")


def _claimed(
    view: ClusterView, position: int, due: float, committed: float, **data: object
) -> None:
    """Fold a ``TaskStarted`` of node ``a`` due at ``due`` and committed at ``committed``."""
    event = TaskStarted(task="t", run_id=f"r{position}", scheduled_for=due, **data)  # type: ignore[arg-type]
    new = NewEvent.of(event, Meta(node="a"))
    view.apply(Recorded.of(position, "task-t", position, new, committed))


def test_the_next_nodes_wait_as_long_as_claims_currently_take() -> None:
    view = ClusterView()
    now = time.time()
    for name in ("a", "b", "c"):
        view.node(name).last_heartbeat = now
    delays = lambda: sorted(Rendezvous(view, n, 0.2).delay("t0") for n in "abc")  # noqa: E731
    assert delays() == [0.0, 0.2, 0.4]
    # claims commit up to 3 s after their due time: the others wait twice that more
    _claimed(view, 1, now - 5, now - 4)
    _claimed(view, 2, now - 4, now - 1)
    _claimed(view, 3, now - 2, now - 1.5)
    assert view.claim_lag(now) == pytest.approx(3.0)
    assert delays() == pytest.approx([0.0, 6.2, 12.4])
    # the first node still claims at once; the wait is capped (a node is lost past it)
    assert sorted(Rendezvous(view, n, 0.2, max_lag=1.0).delay("t0") for n in "abc") == (
        pytest.approx([0.0, 1.2, 2.4])
    )
    # runs asked for now, retries or misfires are not late for a schedule: not counted
    _claimed(view, 4, now - 30, now, trigger="request")
    _claimed(view, 5, now - 30, now, trigger="misfire")
    assert view.claim_lag(now) == pytest.approx(3.0)
    # the lag is that of the last 10 s of claims: it falls with the load
    _claimed(view, 6, now + 1, now + 1.1)
    assert view.claim_lag(now + 8.5) == pytest.approx(3.0)
    assert view.claim_lag(now + 10.5) == pytest.approx(0.1)
    assert view.claim_lag(now + 30) == 0.0


async def test_two_survivors_racing_record_the_loss_once(pg_dsn: str) -> None:
    await plant_a_dead_node(pg_dsn, stale_after=3600)  # no watcher acts by itself
    services = [ClusterService(), ClusterService()]
    slow = {"cluster": {"heartbeat_s": 0.2, "stale_after_s": 3600.0}}

    def settings(node: str) -> Settings:
        return Settings(store="postgres", dsn=pg_dsn, node=node, services=slow)

    async with (
        Kernel(settings("a"), services=[services[0]]) as a,
        Kernel(settings("b"), services=[services[1]]) as b,
    ):
        await a.settle()
        await b.settle()
        with anyio.fail_after(30):
            # both decide from the same view, at the same time
            async with anyio.create_task_group() as tg:
                for s in services:
                    tg.start_soon(s._declare_lost, "ghost")
            assert len(await a.read(types=["NodeLost"])) == 1
            assert len(await a.read(types=["TaskFailed"])) == 1


async def test_a_lost_run_is_retried_once_by_the_survivors(pg_dsn: str) -> None:
    from kernel.sdk import task
    from services.scheduler.service import SchedulerService

    async def flaky() -> None:
        return None

    spec = task(every="1h", retries=1, retry_delay="0.1s")(flaky).__xcore_task__
    async with (
        Kernel(node_settings(pg_dsn, "a"), services=[ClusterService(), SchedulerService()]) as a,
        Kernel(node_settings(pg_dsn, "b"), services=[ClusterService(), SchedulerService()]) as b,
    ):
        for k in (a, b):
            scheduler = k.services["scheduler"]
            assert isinstance(scheduler, SchedulerService)
            await scheduler.register("p", [spec])
        # a third node joins, claims a run of p.flaky, and dies
        await plant_a_dead_node(pg_dsn)
        meta = Meta(node="ghost", boot="g0")
        run = TaskStarted(task="p.flaky", run_id="r2", scheduled_for=time.time() - 5)
        await a.store.append([NewEvent.of(run, meta)], stream="task-p.flaky")
        with anyio.fail_after(60):
            while not [
                r for r in await a.read(types=["TaskSucceeded"]) if r.data["run_id"] == "r2"
            ]:
                await anyio.sleep(0.05)
            await anyio.sleep(1.0)  # the other survivor's retry had its chance too
            starts = [r for r in await a.read(types=["TaskStarted"]) if r.data["run_id"] == "r2"]
            assert [(r.data["attempt"], r.data["trigger"]) for r in starts] == [
                (1, "schedule"),
                (2, "retry"),
            ]
            assert starts[1].meta.node in ("a", "b")


async def test_two_nodes_with_one_id_are_reported(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        Kernel(node_settings(pg_dsn, "same"), services=[ClusterService()]),
        Kernel(node_settings(pg_dsn, "same"), services=[ClusterService()]),
    ):
        with anyio.fail_after(30):
            while "must be unique" not in caplog.text:
                await anyio.sleep(0.05)


SKEWED_NODE = """
import asyncio, sys, time

_real = time.time
time.time = lambda: _real() - 120.0  # this machine's clock is two minutes behind

from kernel import Kernel
from kernel.settings import Settings
from services.cluster.service import ClusterService


async def main(dsn: str) -> None:
    settings = Settings(
        store="postgres",
        dsn=dsn,
        node="skewed",
        services={"cluster": {"heartbeat_s": 0.2, "stale_after_s": 1.0}},
    )
    async with Kernel(settings, services=[ClusterService()]):
        print("up", flush=True)
        await asyncio.sleep(3600)


asyncio.run(main(sys.argv[1]))
"""


async def test_a_node_whose_clock_is_behind_is_not_lost_while_it_beats(
    pg_dsn: str, tmp_path: Path
) -> None:
    """A node's heartbeats were judged by the watcher's clock against the beating node's
    timestamps: a clock behind by more than stale_after_s made it 'lost' at every beat
    (its runs failed and retried elsewhere while it ran them)."""
    script = tmp_path / "skewed.py"
    script.write_text(SKEWED_NODE)
    async with Kernel(node_settings(pg_dsn, "a"), services=[ClusterService()]) as a:
        process = await anyio.open_process(
            [sys.executable, str(script), pg_dsn], cwd=Path(__file__).parents[3]
        )
        try:
            with anyio.fail_after(90):

                async def beats() -> int:
                    found = await a.read(types=["NodeHeartbeat"], stream=node_stream("skewed"))
                    return len(found)

                while await beats() < 25:  # five seconds of beats, five stale_after_s
                    await anyio.sleep(0.1)
                await a.settle()
                assert await a.read(types=["NodeLost"]) == []
                # and its death is still seen, on the watcher's clock
                process.kill()
                while not await a.read(types=["NodeLost"]):
                    await anyio.sleep(0.1)
                assert [r.data["node"] for r in await a.read(types=["NodeLost"])] == ["skewed"]
        finally:
            if process.returncode is None:
                process.kill()
            await process.wait()
