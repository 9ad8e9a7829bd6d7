"""A node that is not first for a task starts none of its runs while the first node
claims them, and takes a run over when the first node does not claim it.

Before, every node started a run task for every due run of every task and let it sleep
out its grace: with three nodes, two of every three runs cost a task, a claim key and
an exception for nothing, all at the burst when the runs fell due — on the same cores as
the runs that did start (three nodes on one machine were 2.2 times later than one)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import anyio
import pytest

from kernel import Kernel
from kernel.sdk import current_task, task
from kernel.settings import Settings
from services.cluster.placement import Rendezvous
from services.cluster.projection import ClusterView
from services.cluster.service import ClusterService
from services.scheduler.service import SchedulerService

pytestmark = pytest.mark.postgres

#: A node's grace before it takes a run over: long enough that the first node, even on a
#: loaded machine, claims its runs well within it.
GRACE = 6.0


def settings(dsn: str, node: str, grace: float = GRACE) -> Settings:
    return Settings(
        store="postgres",
        dsn=dsn,
        node=node,
        reload=False,
        services={"cluster": {"heartbeat_s": 0.2, "stale_after_s": 30.0, "claim_grace_s": grace}},
    )


def first_for_a(n: int, prefix: str) -> list[str]:
    """Names of tasks of plugin ``p`` that node a ranks before node b."""
    view = ClusterView()
    for name in ("a", "b"):
        view.node(name).last_heartbeat = time.time() + 3600
    ranking = Rendezvous(view, "b", 0)
    names = (f"{prefix}{i}" for i in range(1000))
    return [x for x in names if ranking.rank(f"p.{x}")[0] == "a"][:n]


def spec(name: str, ran: list[tuple[str, float]]) -> Any:
    async def fn() -> None:
        ran.append((name, current_task().scheduled_for.timestamp()))

    fn.__name__ = name
    return task(every="1s")(fn).__xcore_task__


def waiting_runs(scheduler: SchedulerService, tasks: set[str]) -> int:
    """How many run tasks of ``tasks`` the node's runner holds now."""
    n = 0
    for bg in scheduler._runner._background:
        coro: Any = bg.get_coro()
        frame = coro.cr_frame if coro.__qualname__ == "Runner.run" else None
        if frame is not None and frame.f_locals["entry"].task.id in tasks:
            n += 1
    return n


async def test_only_the_first_node_starts_a_run_and_another_takes_over_when_it_does_not(
    pg_dsn: str,
) -> None:
    shared = first_for_a(4, "s")
    [only_b] = first_for_a(1, "b")  # a is first for it too, but a does not have it
    ran = {"a": [], "b": []}  # type: dict[str, list[tuple[str, float]]]
    clusters = [ClusterService(), ClusterService()]
    schedulers = [SchedulerService(), SchedulerService()]
    async with (
        Kernel(settings(pg_dsn, "a"), services=[clusters[0], schedulers[0]]) as a,
        Kernel(settings(pg_dsn, "b"), services=[clusters[1], schedulers[1]]),
    ):
        with anyio.fail_after(90):
            while not all(c.describe()["alive"] == ["a", "b"] for c in clusters):
                await anyio.sleep(0.05)
            await schedulers[0].register("p", [spec(x, ran["a"]) for x in shared])
            await schedulers[1].register(
                "p", [spec(x, ran["b"]) for x in shared] + [spec(only_b, ran["b"])]
            )
            most = 0
            ids = {f"p.{x}" for x in shared}
            while sum(1 for name, _ in ran["b"] if name == only_b) < 2:
                most = max(most, waiting_runs(schedulers[1], ids))
                await asyncio.sleep(0.01)
        # node b started no run of a task node a claims in time...
        assert most == 0
        assert not [name for name, _ in ran["b"] if name != only_b]
        assert {name for name, _ in ran["a"]} == set(shared)
        # ...and took over the runs a never claimed, each once
        with anyio.fail_after(60):
            while True:
                started = await a.read(types=["TaskStarted"])
                if sum(1 for r in started if r.data["task"] == f"p.{only_b}") >= 2:
                    break
                await anyio.sleep(0.05)
        slots = Counter((r.data["task"], r.data["scheduled_for"]) for r in started)
        assert max(slots.values()) == 1
        takeovers = [r for r in started if r.data["task"] == f"p.{only_b}"]
        assert len(takeovers) >= 2 and {r.meta.node for r in takeovers} == {"b"}
