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
