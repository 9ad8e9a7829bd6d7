"""The claim lag measures how late first nodes claim, not how long takeovers wait.

A takeover waits ``claim_grace_s + 2 * lag``; when its own claim counted in the lag, each
takeover raised the next one's wait (0.2, 0.6, 1.4, 2.9, 6 s... up to stale_after_s,
measured after a SIGKILL): the runs of a dead node were taken over later and later,
out of order with the runs after it was recorded lost."""

from __future__ import annotations

import time

import anyio
import pytest

from kernel import Kernel
from services.cluster.service import ClusterService
from services.scheduler.service import SchedulerService
from tests.services.cluster.test_takeover import first_for_a, settings, spec

pytestmark = pytest.mark.postgres


async def test_takeovers_do_not_raise_the_claim_lag(pg_dsn: str) -> None:
    [only_b] = first_for_a(1, "lag")  # a is first for it, but a does not have it
    ran: list[tuple[str, float]] = []
    clusters = [ClusterService(), ClusterService()]
    scheduler = SchedulerService()
    async with (
        Kernel(settings(pg_dsn, "a"), services=[clusters[0]]) as a,
        Kernel(settings(pg_dsn, "b"), services=[clusters[1], scheduler]),
    ):
        with anyio.fail_after(120):
            while not all(c.describe()["alive"] == ["a", "b"] for c in clusters):
                await anyio.sleep(0.05)
            await scheduler.register("p", [spec(only_b, ran)])
            while len(await a.read(types=["TaskStarted"])) < 3:
                await anyio.sleep(0.05)
            await a.settle()
        started = await a.read(types=["TaskStarted"])
        assert {r.meta.node for r in started} == {"b"}
        assert all(r.data["takeover"] for r in started)
        # b's claims were all takeovers: late by b's wait, but no node claimed late
        assert clusters[0].view is not None and clusters[1].view is not None
        assert clusters[0].view.claim_lag(time.time()) == 0
        assert clusters[1].view.claim_lag(time.time()) == 0
