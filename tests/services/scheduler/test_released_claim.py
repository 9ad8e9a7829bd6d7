"""A run claimed ahead of its instant and killed (SIGKILL) before it: the restart
releases the claim (``TaskReleased``) and the instant runs once; a run killed after its
code began stays interrupted and runs no more (real subprocesses, real SQLite log).

The children claim with a long lead (``max_lead_ms`` of 60 s: the first claim is made
the whole lead ahead), so the kill lands seconds before the instant without timing
luck: the child reports its claim only once the ``TaskStarted`` is durable.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import anyio

from kernel import Kernel, Recorded
from kernel.sdk import current_task
from services.scheduler.runs import fold_runs

from .helpers import make_kernel, spec, wait_events

ROOT = Path(__file__).resolve().parents[3]

#: How far ahead of the children's boot the instant lies: room for a kill and a
#: restart on a loaded machine (a restart after the instant is "interrupted", rightly).
AHEAD_S = 10.0
LEAD_MS = 60_000.0

CHILD = textwrap.dedent(
    """
    import asyncio, sys, time
    from datetime import UTC, datetime
    from pathlib import Path
    from kernel import Kernel, Settings
    from kernel.sdk import current_task, task
    from services.scheduler.service import SchedulerService

    data, mode, instant, out, marker, starts = sys.argv[1:7]
    out, marker, starts = Path(out), Path(marker), int(starts)
    at = datetime.fromtimestamp(float(instant), UTC)

    @task(name="once", at=at)
    async def once():
        with out.open("a") as f:
            f.write(current_task().run_id + "\\n")
        if mode == "hang":
            await asyncio.sleep(3600)

    @task(name="flaky", at=at, retries=1, retry_delay=%(retry)r)
    async def flaky():
        with out.open("a") as f:
            f.write(f"{current_task().attempt}\\n")
        raise RuntimeError("first attempt fails")

    @task(name="tick", every=%(every)r)
    async def tick():
        with out.open("a") as f:
            f.write(repr(current_task().scheduled_for.timestamp()) + "\\n")

    async def main():
        service = SchedulerService()
        settings = Settings(
            data_dir=data, node="child",
            services={"scheduler": {"max_lead_ms": %(lead)r, "manage_gc": False}},
        )
        async with Kernel(settings, services=[service]) as kernel:
            fn = {"retry": flaky, "every": tick}.get(mode, once)
            await service.register("rel", [fn.__xcore_task__])
            while len(await kernel.read(types=["TaskStarted"])) < starts:
                await asyncio.sleep(0.01)
            marker.write_text("claimed")
            await asyncio.sleep(3600)

    asyncio.run(main())
    """
) % {"lead": LEAD_MS, "retry": AHEAD_S, "every": 2 * AHEAD_S}


async def _child(
    tmp_path: Path,
    mode: str,
    instant: float,
    out: Path,
    starts: int,
    name: str,
    until: Callable[[], bool] = lambda: True,
) -> None:
    """Run the child until ``starts`` TaskStarted are durable in the log (and ``until``
    holds), then SIGKILL it."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    marker = tmp_path / f"{name}.marker"
    proc = subprocess.Popen(
        [sys.executable, script, tmp_path, mode, repr(instant), out, marker, str(starts)],
        cwd=ROOT,
    )
    try:
        with anyio.fail_after(60):
            while not (marker.exists() and until()):
                assert proc.poll() is None, "the child process died on its own"
                await anyio.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


async def _stream(kernel: Kernel, task_id: str) -> list[Recorded]:
    return await kernel.read(stream=f"task-{task_id}")


async def test_claimed_ahead_killed_before_instant_runs_once_after_two_restarts(
    tmp_path: Path,
) -> None:
    out = tmp_path / "ran.txt"
    instant = time.time() + AHEAD_S
    # first boot: claims the run a lead ahead, killed before the instant
    await _child(tmp_path, "once", instant, out, 1, "first")
    # second boot: releases that claim, claims the instant again ahead, killed again
    await _child(tmp_path, "once", instant, out, 2, "second")
    assert _lines(out) == [], "the code ran before its instant"
    assert time.time() < instant, "the machine is too slow for this test's margin"

    async def once() -> None:
        with out.open("a") as f:
            f.write(current_task().run_id + "\n")

    kernel, service = make_kernel(tmp_path, max_lead_ms=LEAD_MS, manage_gc=False)
    async with kernel:
        await service.register(
            "rel", [spec(once, name="once", at=datetime.fromtimestamp(instant, UTC))]
        )
        done = await wait_events(kernel, "TaskSucceeded", timeout=AHEAD_S + 60)
        events = await _stream(kernel, "rel.once")
        await anyio.sleep(0.3)  # nothing more comes
        assert len(await _stream(kernel, "rel.once")) == len(events)
        row = service.table.tasks["rel.once"]
        assert not row.running and row.last is not None and row.last.outcome == "succeeded"
        assert [r.outcome for r in row.runs] == ["released", "released", "succeeded"]
    listed = fold_runs(events, time.time())
    assert [r["status"] for r in listed] == ["succeeded", "released", "released"]
    assert listed[1]["started_at"] is None and "released" in listed[1]["error"]
    types = [r.type for r in events]
    assert "TaskFailed" not in types, types
    starts = [r for r in events if r.type == "TaskStarted"]
    released = [r for r in events if r.type == "TaskReleased"]
    assert len(starts) == 3 and len(released) == 2 and types.count("TaskSucceeded") == 1
    # one start and one outcome per claim, each claim under its own key
    assert [r.data["run_id"] for r in released] == [r.data["run_id"] for r in starts[:2]]
    assert [r.data["claim"] for r in released] == [r.meta.id for r in starts[:2]]
    assert len({r.meta.id for r in starts}) == 3
    assert all(r.data["scheduled_for"] == starts[0].data["scheduled_for"] for r in starts)
    assert released[0].data["next_run"] == starts[0].data["scheduled_for"]
    # the code ran once, at (not before) its instant, as the last claim's run
    assert _lines(out) == [starts[2].data["run_id"]] == [done[0].data["run_id"]]
    assert done[0].data["started_at"] >= instant
    assert "released" in released[0].data["reason"]


async def test_retry_claimed_ahead_and_killed_is_pending_again(tmp_path: Path) -> None:
    out = tmp_path / "attempts.txt"
    instant = time.time() + 1.0
    # the first attempt runs at the instant and fails; its retry (AHEAD_S later) is
    # claimed at once (the lead is longer), then the process is killed
    await _child(tmp_path, "retry", instant, out, 2, "first")
    assert _lines(out) == ["1"]

    async def flaky() -> None:
        with out.open("a") as f:
            f.write(f"{current_task().attempt}\n")

    kernel, service = make_kernel(tmp_path, max_lead_ms=LEAD_MS, manage_gc=False)
    async with kernel:
        at = datetime.fromtimestamp(instant, UTC)
        await service.register(
            "rel", [spec(flaky, name="flaky", at=at, retries=1, retry_delay=AHEAD_S)]
        )
        done = await wait_events(kernel, "TaskSucceeded", timeout=AHEAD_S + 60)
        events = await _stream(kernel, "rel.flaky")
    types = [r.type for r in events]
    assert _lines(out) == ["1", "2"], "the retry ran once, after the restart"
    released = [r.data for r in events if r.type == "TaskReleased"]
    assert len(released) == 1 and released[0]["trigger"] == "retry"
    assert released[0]["retry_at"] is not None
    assert done[0].data["started_at"] >= released[0]["retry_at"]
    assert types.count("TaskStarted") == 3  # attempt 1, the released retry, the retry
    assert [r.data["kind"] for r in events if r.type == "TaskFailed"] == ["error"]


async def test_killed_after_its_code_began_stays_interrupted(tmp_path: Path) -> None:
    out = tmp_path / "ran.txt"
    instant = time.time() + 1.0
    # claimed ahead, then its code starts at the instant (and hangs): killed after that
    await _child(tmp_path, "hang", instant, out, 1, "first", until=lambda: bool(_lines(out)))
    assert len(_lines(out)) == 1

    async def once() -> None:
        with out.open("a") as f:
            f.write(current_task().run_id + "\n")

    kernel, service = make_kernel(tmp_path, max_lead_ms=LEAD_MS, manage_gc=False)
    async with kernel:
        failed = await wait_events(kernel, "TaskFailed")
        await service.register(
            "rel", [spec(once, name="once", at=datetime.fromtimestamp(instant, UTC))]
        )
        await anyio.sleep(1.0)  # a run re-armed would start at once (its instant passed)
        events = await _stream(kernel, "rel.once")
    types = [r.type for r in events]
    assert "TaskReleased" not in types
    assert types.count("TaskStarted") == 1
    assert [f.data["kind"] for f in failed] == ["interrupted"]
    assert _lines(out) == [failed[0].data["run_id"]], "the run ran twice"


async def test_interval_claimed_ahead_and_killed_runs_its_period_once(tmp_path: Path) -> None:
    # every 20 s with a 60 s lead: the short-interval path claims half a period (10 s)
    # ahead, so the child is killed 10 s before the due time
    out = tmp_path / "ticks.txt"
    await _child(tmp_path, "every", 0.0, out, 1, "first")
    assert _lines(out) == []

    async def tick() -> None:
        with out.open("a") as f:
            f.write(repr(current_task().scheduled_for.timestamp()) + "\n")

    kernel, service = make_kernel(tmp_path, max_lead_ms=LEAD_MS, manage_gc=False)
    async with kernel:
        await service.register("rel", [spec(tick, name="tick", every=2 * AHEAD_S)])
        done = await wait_events(kernel, "TaskSucceeded", timeout=AHEAD_S + 60)
        events = await _stream(kernel, "rel.tick")
    released = [r.data for r in events if r.type == "TaskReleased"]
    assert len(released) == 1 and released[0]["trigger"] == "schedule"
    starts = [r for r in events if r.type == "TaskStarted"]
    assert [r.data["scheduled_for"] for r in starts][:2] == [released[0]["scheduled_for"]] * 2
    assert starts[1].meta.id != starts[0].meta.id
    assert done[0].data["run_id"] == starts[1].data["run_id"]
    assert "TaskFailed" not in [r.type for r in events]
    lines = _lines(out)
    assert abs(float(lines[0]) - released[0]["scheduled_for"]) < 1e-5
    assert len(lines) == len(set(lines))


async def test_stopped_gracefully_after_the_claim_runs_the_instant_after_the_restart(
    tmp_path: Path,
) -> None:
    """A graceful stop (SIGTERM, a deploy) between the early claim and the instant: the
    code never ran, so the run is released as after a SIGKILL, not failed as
    "cancelled" (which lost the instant: the process back before it ran nothing)."""
    out = tmp_path / "ran.txt"
    instant = time.time() + AHEAD_S
    at = datetime.fromtimestamp(instant, UTC)

    async def once() -> None:
        with out.open("a") as f:
            f.write(current_task().run_id + "\n")

    for boot in range(2):  # two graceful restarts before the instant
        kernel, service = make_kernel(tmp_path, max_lead_ms=LEAD_MS, manage_gc=False)
        async with kernel:
            await service.register("rel", [spec(once, name="once", at=at)])
            await wait_events(kernel, "TaskStarted", boot + 1)
        assert _lines(out) == [], "the code ran before its instant"
    assert time.time() < instant, "the machine is too slow for this test's margin"

    kernel, service = make_kernel(tmp_path, max_lead_ms=LEAD_MS, manage_gc=False)
    async with kernel:
        await service.register("rel", [spec(once, name="once", at=at)])
        done = await wait_events(kernel, "TaskSucceeded", timeout=AHEAD_S + 60)
        await anyio.sleep(0.3)  # nothing more comes
        events = await _stream(kernel, "rel.once")
        row = service.table.tasks["rel.once"]
        assert [r.outcome for r in row.runs] == ["released", "released", "succeeded"]
        # the task's detail (the UI's recent runs) shows no start for a released run:
        # its claim time read as a start made it look started early
        recent = row.detail()["recent_runs"]
        assert [r["started_at"] is None for r in recent] == [False, True, True], recent
    types = [r.type for r in events]
    assert "TaskFailed" not in types, types
    starts = [r for r in events if r.type == "TaskStarted"]
    released = [r for r in events if r.type == "TaskReleased"]
    assert len(starts) == 3 and len(released) == 2 and types.count("TaskSucceeded") == 1
    assert [r.data["claim"] for r in released] == [r.meta.id for r in starts[:2]]
    assert all(r.data["next_run"] == starts[0].data["scheduled_for"] for r in released)
    assert _lines(out) == [done[0].data["run_id"]] == [starts[2].data["run_id"]]
    assert done[0].data["started_at"] >= instant


async def test_retry_claimed_ahead_and_stopped_gracefully_is_pending_again(
    tmp_path: Path,
) -> None:
    out = tmp_path / "attempts.txt"
    at = datetime.fromtimestamp(time.time() + 0.5, UTC)

    async def flaky() -> None:
        with out.open("a") as f:
            f.write(f"{current_task().attempt}\n")
        if current_task().attempt == 1:
            raise RuntimeError("first attempt fails")

    declared = spec(flaky, name="flaky", at=at, retries=1, retry_delay=AHEAD_S)
    kernel, service = make_kernel(tmp_path, max_lead_ms=LEAD_MS, manage_gc=False)
    async with kernel:
        await service.register("rel", [declared])
        await wait_events(kernel, "TaskStarted", 2)  # the retry, claimed a lead ahead
    assert _lines(out) == ["1"]
    async with make_kernel(tmp_path)[0] as kernel:  # (nothing registered: nothing runs)
        (listed,) = fold_runs(await _stream(kernel, "rel.flaky"), time.time())
    # the run is not over: `xcore task run --wait` and the runs list read it as retrying
    assert listed["status"] == "retrying" and listed["retry_at"] is not None, listed
    assert listed["attempts"] == 1

    kernel, service = make_kernel(tmp_path, max_lead_ms=LEAD_MS, manage_gc=False)
    async with kernel:
        await service.register("rel", [declared])
        done = await wait_events(kernel, "TaskSucceeded", timeout=AHEAD_S + 60)
        events = await _stream(kernel, "rel.flaky")
    assert _lines(out) == ["1", "2"], "the retry ran once, after the restart"
    released = [r.data for r in events if r.type == "TaskReleased"]
    assert len(released) == 1 and released[0]["trigger"] == "retry"
    assert done[0].data["started_at"] >= released[0]["retry_at"]
    assert [r.data["kind"] for r in events if r.type == "TaskFailed"] == ["error"]
