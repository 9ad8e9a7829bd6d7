"""Due times are wall-clock instants: a wall clock stepped forward while the timer
sleeps (an NTP correction, a VM or laptop resumed from suspend, which the monotonic
clock the event loop sleeps on does not count) starts the runs it made due at once,
not when the sleep computed before the step would have ended."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest

from .helpers import make_kernel, spec, wait_events

HOUR = 3600.0


async def test_a_clock_stepped_forward_past_a_due_time_starts_its_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = time.time
    step = [0.0]
    # the system clock itself (not the scheduler's code): every reader of the wall
    # clock sees the step, as after a resume from suspend
    monkeypatch.setattr(time, "time", lambda: real() + step[0])
    kernel, service = make_kernel(tmp_path)
    ran: list[float] = []

    async def work() -> None:
        ran.append(time.time())

    due = time.time() + HOUR
    async with kernel:
        at = datetime.fromtimestamp(due, UTC).isoformat()
        await service.register("p", [spec(work, name="job", at=at)])
        await anyio.sleep(0.3)  # the timer sleeps towards its instant, an hour away
        step[0] = HOUR + 1.0  # the wall clock jumps past the instant
        (done,) = await wait_events(kernel, "TaskSucceeded", timeout=30)
    assert done.data["task"] == "p.job"
    assert len(ran) == 1 and ran[0] >= due
