"""In a cluster, an interval without a start is due at the same instants on every node.

Before, each node ran ``every=`` from its own registration: nodes that started apart
ticked at phases of their own. Claims still agreed (keyed by the period's index), but a
node whose phase came earlier in the period took over the runs of the task's first node
before that node's due time came (three real nodes whose starts straddled a second
boundary: one node ran all 40 tasks, the others none), and an ``any`` holding such an
interval, keyed by its instant, ran once per node.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import Any

import anyio
import pytest

from kernel import Kernel
from kernel.sdk import current_task, task
from services.cluster.service import ClusterService
from services.scheduler.service import SchedulerService
from tests.services.cluster.test_takeover import first_for_a, settings

pytestmark = pytest.mark.postgres

EVERY = 4.0
#: Node b waits this long before taking a run over: shorter than the gap its old phase
#: put between its due time and node a's, long enough for a's claims to reach b.
GRACE = 2.0


def specs(names: list[str], ran: list[tuple[str, float]], every: float = EVERY) -> list[Any]:
    def make(name: str, **trigger: Any) -> Any:
        async def fn() -> None:
            ran.append((name, current_task().scheduled_for.timestamp()))

        fn.__name__ = name
        return task(**trigger)(fn).__xcore_task__

    out = [make(x, every=every) for x in names]
    far = "2099-01-01T00:00:00Z"
    out.append(make("either", trigger={"any": [{"every": every}, {"at": far}]}))
    return out


async def at_phase(phase: float) -> None:
    """Sleep until the wall clock is ``phase`` seconds into a period of ``EVERY``."""
    await anyio.sleep((phase - time.time() % EVERY) % EVERY)


async def test_nodes_that_register_apart_share_the_due_times_and_the_first_node_runs(
    pg_dsn: str,
) -> None:
    names = first_for_a(4, "g")
    ran: dict[str, list[tuple[str, float]]] = {"a": [], "b": []}
    clusters = [ClusterService(), ClusterService()]
    schedulers = [SchedulerService(), SchedulerService()]
    async with (
        Kernel(settings(pg_dsn, "a", GRACE), services=[clusters[0], schedulers[0]]) as a,
        Kernel(settings(pg_dsn, "b", GRACE), services=[clusters[1], schedulers[1]]),
    ):
        with anyio.fail_after(90):
            while not all(c.describe()["alive"] == ["a", "b"] for c in clusters):
                await anyio.sleep(0.05)
            # A reload that changed the interval, applied by the nodes at different
            # moments: a node that had the task adopts no other node's next due time
            # (its own schedule changed), so before, each kept the phase of its own
            # reload. a reloads late in a period, b early in the next: b's phase would
            # put its due time EVERY - 3 s before a's, more than its grace.
            await schedulers[1].register("p", specs(names, ran["b"], every=2 * EVERY))
            await at_phase(EVERY - 0.6)
            await schedulers[0].register("p", specs(names, ran["a"]))
            await at_phase(0.4)
            await schedulers[1].register("p", specs(names, ran["b"]))
            registered = time.time()
            while sum(1 for _, due in ran["a"] + ran["b"] if due > registered + EVERY) < 3 * (
                len(names) + 1
            ):
                await anyio.sleep(0.05)
            await anyio.sleep(GRACE + 1)  # any takeover of those runs has fired
            started = await a.read(types=["TaskStarted"])
    # every run fell on the grid, the same instants whichever node registered when
    dues = [due for _, due in ran["a"] + ran["b"]]
    assert all(abs(due / EVERY - round(due / EVERY)) < 1e-6 for due in dues), dues
    # the first node ran its tasks: the other took none of them over
    assert not [x for x in ran["b"] if x[0] in names], ran["b"]
    assert {x for x, _ in ran["a"]} >= set(names)
    # and each period ran once, in the log and in the runs themselves
    slots = Counter((r.data["task"], r.data["scheduled_for"]) for r in started)
    assert max(slots.values()) == 1
    done = Counter((x, math.floor(due / EVERY + 1e-6)) for x, due in ran["a"] + ran["b"])
    assert max(done.values()) == 1, [k for k, n in done.items() if n > 1]
    assert sum(1 for x, _ in done if x == "either") >= 3
