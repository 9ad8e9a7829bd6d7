"""A timed run's dependencies are judged at its due time, not when its timer fires a
lead ahead of it: a dependency that finishes between the two does not get the run
skipped (as ``max_instances``, the lead never decides)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

from .helpers import make_kernel, spec, wait_events


def _at(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).isoformat()


async def test_a_dependency_finished_by_the_due_time_lets_the_run_run(tmp_path: Path) -> None:
    # A 2 s lead: "then" (due at T + 1.5 s) fires at T - 0.5 s, before "first" (due at T,
    # 0.3 s long) has even started; by its due time "first" has succeeded.
    kernel, service = make_kernel(tmp_path, max_lead_ms=2000)
    ran: list[str] = []

    async def first() -> None:
        await asyncio.sleep(0.3)
        ran.append("first")

    async def then() -> None:
        ran.append("then")

    async with kernel:
        service._runner._append_peak = 10.0  # the lead stays at its 2 s maximum
        t = time.time() + 4
        await service.register(
            "p",
            [
                spec(first, at=_at(t)),
                spec(then, at=_at(t + 1.5), depends_on="first"),
            ],
        )
        await wait_events(
            kernel,
            "TaskSucceeded",
            where=lambda r: r.data["task"] == "p.then",
            timeout=30,
        )
        await kernel.settle()
        assert await kernel.read(types=["TaskSkipped"]) == []
    assert ran == ["first", "then"]


async def test_a_dependency_running_at_the_due_time_skips_the_run(tmp_path: Path) -> None:
    # "first" every 3 s (fired 1.5 s ahead): its first run is quick, its second lasts
    # 1.5 s. "then" (due 0.4 s into that second run) fires 2 s ahead, before that second
    # run is even claimed, while "first"'s latest run has succeeded: at its due time
    # "first" is running, so it is skipped.
    kernel, service = make_kernel(tmp_path, max_lead_ms=2000)
    ran: list[str] = []
    firsts: list[float] = []

    async def first() -> None:
        firsts.append(time.time())
        ran.append("first")
        if len(firsts) == 2:
            await asyncio.sleep(1.5)
            ran.append("first ends")

    async def then() -> None:
        ran.append("then")

    async with kernel:
        service._runner._append_peak = 10.0  # the lead stays at its 2 s maximum
        await service.register("p", [spec(first, every="3s")])
        entry = service._tasks["p.first"]
        assert entry.next_due is not None
        second = entry.next_due + 3  # the due time of "first"'s second run
        await service.register(
            "p",
            [
                spec(first, every="3s"),
                spec(then, at=_at(second + 0.4), depends_on="first"),
            ],
        )
        (skipped,) = await wait_events(
            kernel, "TaskSkipped", where=lambda r: r.data["task"] == "p.then", timeout=30
        )
        await wait_events(kernel, "TaskSucceeded", 2, timeout=30)
    assert "first is running" in skipped.data["reason"], skipped.data
    assert "then" not in ran


async def test_a_dependency_claimed_ahead_of_a_later_instant_is_not_running(
    tmp_path: Path,
) -> None:
    # "then" is due 0.5 s before "first"'s second run, which is claimed (1.5 s ahead)
    # by then: at "then"'s due time that run has not started, so "first" is as its first
    # run left it (succeeded) and "then" runs.
    kernel, service = make_kernel(tmp_path, max_lead_ms=2000)
    ran: list[str] = []

    async def first() -> None:
        ran.append("first")

    async def then() -> None:
        ran.append("then")

    async with kernel:
        service._runner._append_peak = 10.0  # the lead stays at its 2 s maximum
        await service.register("p", [spec(first, every="3s")])
        entry = service._tasks["p.first"]
        assert entry.next_due is not None
        second = entry.next_due + 3  # the due time of "first"'s second run
        await service.register(
            "p",
            [
                spec(first, every="3s"),
                spec(then, at=_at(second - 0.5), depends_on="first"),
            ],
        )
        await wait_events(
            kernel, "TaskSucceeded", where=lambda r: r.data["task"] == "p.then", timeout=30
        )
        await wait_events(kernel, "TaskSucceeded", 3, timeout=30)
        assert await kernel.read(types=["TaskSkipped"]) == []
    assert ran == ["first", "then", "first"]
