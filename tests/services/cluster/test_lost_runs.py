"""The runs of a lost node are failed even when the survivor that recorded ``NodeLost``
died before failing them (between the two appends): another survivor finishes the job,
and no run is failed twice when several do it at once."""

from __future__ import annotations

import time

import anyio
import pytest

from kernel import Kernel
from kernel.events import Meta, NewEvent
from kernel.store.postgres import PostgresStore
from services.cluster.events import NodeLost, NodeStarted, node_stream
from services.cluster.service import ClusterService
from services.scheduler.events import TaskStarted
from tests.services.cluster.test_membership import node_settings

pytestmark = pytest.mark.postgres


async def plant_a_half_recorded_loss(dsn: str) -> None:
    """Node 'ghost' held runs r1 and r2 and was recorded lost by node 'gone', which died
    before recording the runs' failures."""
    store = PostgresStore(dsn)
    await store.open()
    meta = {"node": "ghost", "boot": "g0"}
    started = NodeStarted(
        node="ghost", boot="g0", version="0", pid=1, host="h", port=1,
        heartbeat_s=0.2, stale_after_s=1.0,
    )  # fmt: skip
    await store.append([NewEvent.of(started, Meta(**meta))], stream=node_stream("ghost"))
    for run in ("r1", "r2"):
        held = TaskStarted(task="p.t", run_id=run, scheduled_for=time.time())
        await store.append([NewEvent.of(held, Meta(**meta))], stream="task-p.t")
    lost = NodeLost(
        node="ghost", boot="g0", last_heartbeat=time.time(), by="gone", runs_failed=["r1", "r2"]
    )
    await store.append(
        [NewEvent.of(lost, Meta(node="gone", boot="x0"))], stream=node_stream("ghost")
    )
    await store.close()


async def test_the_runs_of_a_lost_node_are_failed_once_even_if_its_recorder_died(
    pg_dsn: str,
) -> None:
    await plant_a_half_recorded_loss(pg_dsn)
    services = [ClusterService(), ClusterService()]
    async with (
        Kernel(node_settings(pg_dsn, "a"), services=[services[0]]) as a,
        Kernel(node_settings(pg_dsn, "b"), services=[services[1]]),
    ):
        with anyio.fail_after(30):
            while len(await a.read(types=["TaskFailed"])) < 2:
                await anyio.sleep(0.05)
            await anyio.sleep(1.5)  # both survivors had time to try
        failed = await a.read(types=["TaskFailed"])
        assert sorted((r.data["run_id"], r.data["kind"]) for r in failed) == [
            ("r1", "node_lost"),
            ("r2", "node_lost"),
        ]
        ghost = next(n for n in services[0].describe()["nodes"] if n["node"] == "ghost")
        assert ghost["state"] == "lost" and ghost["runs"] == []
