"""An interval's claim key is its period's index (so nodes ticking at different phases
claim each period once). Two runs of one task in one period on one node — its phase
changed between them — must not pass for one: the second is not started on the first
one's record (a run with an outcome and no start of its own)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from services.scheduler.claim import claim_key
from services.scheduler.specs import CompiledTask
from services.scheduler.triggers import IntervalTrigger, on_grid

from .helpers import make_kernel, spec, wait_events

PERIOD = 10**6  # seconds: both due times below fall in one period


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat()


async def test_a_second_run_in_the_same_period_is_not_started_on_the_firsts_claim(
    tmp_path: Path,
) -> None:
    kernel, service = make_kernel(tmp_path)
    ran: list[str] = []

    async def work() -> None:
        ran.append("ran")

    now = time.time()
    first, second = now + 1.5, now + 3.0
    assert int(first // PERIOD) == int((second + 30) // PERIOD)  # one period
    async with kernel:
        await service.register("p", [spec(work, name="job", every=PERIOD, start=_iso(first))])
        await wait_events(kernel, "TaskSucceeded")
        # the phase moves within the same period
        await service.register("p", [spec(work, name="job", every=PERIOD, start=_iso(second))])
        (skipped,) = await wait_events(kernel, "TaskSkipped", timeout=60)
        assert "claimed by run" in skipped.data["reason"]
        await kernel.settle()
        starts = {r.data["run_id"] for r in await kernel.read(types=["TaskStarted"])}
        ends = [r.data["run_id"] for r in await kernel.read(types=["TaskSucceeded", "TaskFailed"])]
        assert all(run in starts for run in ends), (starts, ends)  # no outcome without a start
        assert len(ends) == len(starts) == len(ran) == 1


async def test_runs_asked_for_in_one_period_each_start_with_their_own_record(
    tmp_path: Path,
) -> None:
    from services.scheduler.events import TaskRunAccepted, TaskRunRequested, stream_of

    kernel, service = make_kernel(tmp_path)
    ran: list[str] = []

    async def work() -> None:
        ran.append("ran")

    async with kernel:
        await service.register("p", [spec(work, name="job", every="1h")])
        accepted = [
            await kernel.request(
                TaskRunRequested(task="p.job"),
                stream=stream_of("p.job"),
                outcomes=[TaskRunAccepted],
            )
            for _ in range(3)
        ]
        await wait_events(kernel, "TaskSucceeded", 3, timeout=60)
        starts = [r.data["run_id"] for r in await kernel.read(types=["TaskStarted"])]
        ends = [r.data["run_id"] for r in await kernel.read(types=["TaskSucceeded"])]
        assert sorted(starts) == sorted(ends) == sorted(a.data["run_id"] for a in accepted)
        assert len(ran) == 3


async def test_retries_of_a_requested_and_a_timed_run_of_one_period_both_run(
    tmp_path: Path,
) -> None:
    from services.scheduler.events import TaskRunAccepted, TaskRunRequested, stream_of

    kernel, service = make_kernel(tmp_path)
    attempts: list[int] = []

    async def fails() -> None:
        from kernel.sdk import current_task

        attempts.append(current_task().attempt)
        raise RuntimeError("boom")

    now = time.time()
    first = now + 1.0
    assert int(now // PERIOD) == int((first + 60) // PERIOD)  # one period
    async with kernel:
        await service.register(
            "p",
            [spec(fails, name="job", every=PERIOD, start=_iso(first), retries=1, retry_delay=0.2)],
        )
        await kernel.request(
            TaskRunRequested(task="p.job"), stream=stream_of("p.job"), outcomes=[TaskRunAccepted]
        )
        # the requested run and the timed one fail, and each is retried once
        await wait_events(kernel, "TaskFailed", 4, timeout=60)
        assert not await kernel.read(types=["TaskSkipped"])
        assert sorted(attempts) == [1, 1, 2, 2]


@pytest.mark.parametrize("every", [13.37, 0.03, 0.1, 1 / 3, 0.7, 7.0, 3600.0])
def test_each_instant_of_a_grid_has_a_period_of_its_own(every: float) -> None:
    """On a cluster's grid every due time is a period's boundary: its quotient by the
    interval can round below the whole number at epoch scale (1700000259.72 s is the
    127150356th multiple of 13.37 s, and divides to 127150355.99999999), which put two
    runs under one claim key: the second was not started."""
    grid = on_grid(IntervalTrigger(every))
    task = cast(CompiledTask, SimpleNamespace(id="p.job", trigger=grid))
    for since in (1700000246.0, 1_900_000_000.0, 4_000_000_000.0):
        due = grid.first(since)
        keys = []
        for _ in range(3000):
            keys.append(claim_key(task, due, 1, None))
            due = grid.next_after(due)
        assert len(set(keys)) == len(keys)
