"""Hostile and careless declarations found by the attack on issue 13: each is refused
with a reason (never an exception inside registration), and costs bounded work."""

from __future__ import annotations

import functools
import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest

from kernel.sdk import current_task
from services.scheduler.events import ScheduleAdded, TaskPauseRequested, stream_of
from services.scheduler.specs import TaskDeclarationError, compile_spec
from services.scheduler.triggers import (
    ALL_OF_STEPS,
    AllOf,
    IntervalTrigger,
    catch_up,
    parse_trigger,
)

from .helpers import make_kernel, spec, wait_events
from .test_admin import AUTH, server  # noqa: F401  (the fixture)
from .test_crash import ROOT


async def job() -> None:
    pass


OUT_OF_RANGE: list[dict[str, Any]] = [
    {"at": math.nan},
    {"at": math.inf},
    {"at": 1e308},
    {"at": -1e12},
    {"at": "9999-12-31T23:59:59+00:00"},
    {"every": 1e308},
    {"every": "1e308"},
    {"after": 1e308},
    {"every": "10s", "timeout": 1e308},
    {"every": "10s", "keep_result": 1e300},
    {"every": "1s", "start": "2026-01-01T00:00:00Z", "end": "2025-01-01T00:00:00Z"},
    {"every": "1s", "start": math.nan},
    {"cron": "0 0 * * *", "end": 1e308},
    {"trigger": {"calendar": {"days": 1, "start": "9999-12-31"}}},
    {"every": "10s", "retries": True},
    {"every": "10s", "max_instances": True},
]


@pytest.mark.parametrize("options", OUT_OF_RANGE, ids=repr)
def test_out_of_range_times_and_bool_counts_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(TaskDeclarationError):
        compile_spec("p", spec(job, **options))


async def test_a_bad_instant_is_a_rejection_not_a_crash_of_registration(tmp_path: Path) -> None:
    kernel, service = make_kernel(tmp_path)
    async with kernel:
        result = await service.register(
            "p",
            [spec(job, name="nan", at=math.nan), spec(job, name="huge", every=1e308),
             spec(job, name="ok", every="0.05s")],
        )  # fmt: skip
        assert result.accepted == ["p.ok"]
        assert set(result.refused) == {"p.nan", "p.huge"}
        assert "between 1900 and 9000" in result.refused["p.nan"]
        assert "maximum duration" in result.refused["p.huge"]
        rejected = await wait_events(kernel, "TaskRejected", 2)
        assert {r.data["task"] for r in rejected} == {"p.nan", "p.huge"}
        await wait_events(kernel, "TaskSucceeded", where=lambda r: r.data["task"] == "p.ok")


async def test_runtime_schedules_with_out_of_range_times_are_refused(server: Any) -> None:  # noqa: F811
    """Before: the change was recorded, then raised when applied (504), the scheduler's
    subscription died (every later change 504), and ``GET /admin/tasks`` answered 500."""
    kernel, scheduler, url = server
    bodies = ['{"at": NaN}', '{"at": 1e308}', '{"every": 1e308}', '{"after": 1e308}',
              '{"at": -1e12}', '{"every": "1s", "start": "2026-01-01", "end": "2025-01-01"}',
              '{"calendar": {"days": 1, "start": "9999-12-31"}}', '{"cron": "@daily", "end": 1e308}']  # fmt: skip
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        for i, trigger in enumerate(bodies):
            r = await client.post(
                "/admin/tasks",
                headers={**AUTH, "content-type": "application/json"},
                content=f'{{"id": "web.bad{i}", "function": "job", "trigger": {trigger}}}',
            )
            assert r.status_code == 400, (trigger, r.text)
        assert not await kernel.read(types=["ScheduleAdded", "TaskRequestRefused"])
        assert (await client.get("/admin/tasks", headers=AUTH)).status_code == 200
        r = await client.post(
            "/admin/tasks",
            headers=AUTH,
            json={"id": "web.good", "function": "job", "trigger": {"every": "1h"}},
        )
        assert r.status_code == 201, r.text
        assert scheduler.is_scheduled("web.good")


class Counting:
    """A leaf trigger counting how often it is asked (a part that never meets the other)."""

    def __init__(self, every: float, phase: float) -> None:
        self.inner = IntervalTrigger(every, anchor=phase)
        self.calls = 0
        self.recurring = True
        self.description = f"counting {every} {phase}"

    def to_dict(self) -> dict[str, Any]:
        return {}

    def first(self, now: float) -> float | None:
        return self.next_after(now)

    def next_after(self, due: float) -> float | None:
        self.calls += 1
        return self.inner.next_after(due)


def test_nested_all_triggers_share_one_search_bound() -> None:
    """Before: each level searched 10,000 steps per step of the level above (an ``all``
    of an ``all`` took from 20 s to ~110 s on the event loop, to refuse it)."""
    a, b, c = Counting(1.0, 0.0), Counting(1 + 1 / 1024, 0.0), Counting(7.0, 0.5)
    trigger = AllOf([AllOf([a, b]), c])  # the inner meets every 1,025 s, never on c
    assert AllOf([a, b]).first(0.0) == 1025.0
    assert trigger.first(0.0) is None
    assert a.calls + b.calls + c.calls <= 3 * ALL_OF_STEPS


def test_catch_up_counts_anchored_and_bounded_intervals_exactly() -> None:
    """Before: anchored (``start=``) and bounded (``end=``) intervals were counted by
    iterating, capped at 1,000: a day down at 1 s recorded 999 missed runs, not 86,399."""
    now = 1_800_000_000.5
    for trigger in (
        parse_trigger({"every": "1s", "start": "2026-01-01T00:00:00Z"}),
        parse_trigger({"every": "1s", "end": "2030-01-01T00:00:00Z"}),
        parse_trigger({"every": "1s", "start": "2026-01-01T00:00:00Z", "end": "2030-01-01T00:00:00Z"}),
        parse_trigger({"every": "1s", "end": "2027-01-15T08:00:00Z"}),  # ends while down
    ):  # fmt: skip
        due = trigger.first(now - 86_400)
        assert due is not None
        count, last, nxt = catch_up(trigger, due, now)
        # the same answer as iterating
        n, t, probe = 1, due, trigger.next_after(due)
        while probe is not None and probe <= now:
            n, t, probe = n + 1, probe, trigger.next_after(probe)
        assert (count, last, nxt) == (
            n,
            pytest.approx(t),
            pytest.approx(nxt if probe is None else probe),
        ), trigger.description


def test_retry_backoff_of_a_very_late_attempt_is_the_cap() -> None:
    """Before: attempt 1,026 raised OverflowError (2**1024 as a float) in the retry path."""
    task = compile_spec(
        "p", spec(job, every="10s", retries=10**9, retry_delay="0.01s", retry_max_delay="1s")
    )
    assert task.retry_backoff(1026) == 1.0
    assert task.retry_backoff(10**9) == 1.0
    assert task.retry_backoff(3) == pytest.approx(0.04)


async def test_a_cancel_names_the_run_of_its_own_task(server: Any) -> None:  # noqa: F811
    """Before: ``POST /admin/tasks/A/runs/<a run of B>/cancel`` cancelled B's run, and the
    log recorded the cancel on A's stream."""
    kernel, scheduler, url = server
    started = anyio.Event()

    async def slow() -> None:
        started.set()
        await anyio.sleep(60)

    await scheduler.register("x", [spec(slow, name="b", after=0), spec(job, name="a", every="1h")])
    with anyio.fail_after(30):
        await started.wait()
    run_id = (await wait_events(kernel, "TaskStarted", where=lambda r: r.data["task"] == "x.b"))[
        0
    ].data["run_id"]
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        r = await client.post(f"/admin/tasks/x.a/runs/{run_id}/cancel", headers=AUTH)
        assert r.status_code == 409 and r.json()["status"] == "not_running", r.text
        assert scheduler.running("x.b") == 1
        r = await client.post(f"/admin/tasks/x.b/runs/{run_id}/cancel", headers=AUTH)
        assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    failed = await wait_events(kernel, "TaskFailed", where=lambda r: r.data["task"] == "x.b")
    assert failed[0].data["kind"] == "cancelled"


async def test_a_pause_stops_a_coalesce_all_catch_up(tmp_path: Path) -> None:
    """Before: the missed due times of ``coalesce="all"`` kept starting, one after the
    other, after the task was paused (6 runs after ``TaskPaused`` here)."""

    async def slow() -> None:
        await anyio.sleep(0.3)

    declared = [spec(slow, name="t", every="0.2s", coalesce="all")]
    kernel, service = make_kernel(tmp_path)
    async with kernel:
        await service.register("p", declared)
        await wait_events(kernel, "TaskStarted")
    await anyio.sleep(2.5)  # ~12 due times pass while nothing runs
    kernel, service = make_kernel(tmp_path)
    async with kernel:
        before = len(await kernel.read(types=["TaskStarted"]))
        await service.register("p", declared)
        await wait_events(kernel, "TaskStarted", before + 1)
        await kernel.append(TaskPauseRequested(task="p.t"), stream=stream_of("p.t"))
        paused = (await wait_events(kernel, "TaskPaused"))[0].position
        missed = await wait_events(kernel, "TaskMissed", where=lambda r: r.position > paused)
        assert missed[0].data["count"] >= 5
        await kernel.settle()
        started = [r for r in await kernel.read(types=["TaskStarted"]) if r.position > paused]
        # at most the one whose start was being recorded when the pause came
        assert len(started) <= 1, [r.data for r in started]


CATCH_UP_CHILD = """
import asyncio, sys
from pathlib import Path
from kernel import Kernel, Settings
from kernel.sdk import current_task, task
from services.scheduler.service import SchedulerService

data, ticks = sys.argv[1], Path(sys.argv[2])

@task(name="t", every="0.2s", coalesce="all")
async def slow():
    with ticks.open("a") as f:
        f.write(repr(current_task().scheduled_for.timestamp()) + "\\n")
    await asyncio.sleep(0.3)

async def main():
    service = SchedulerService()
    async with Kernel(Settings(data_dir=data, node="child"), services=[service]):
        await service.register("p", [slow.__xcore_task__])
        await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_sigkill_in_the_middle_of_a_coalesce_all_catch_up_loses_no_due_time(
    tmp_path: Path,
) -> None:
    """Before: each catch-up run recorded the schedule's next run after *all* of the
    missed ones, so a process killed after 3 of ~12 catch-up runs restarted past the
    other 9: they neither ran nor were recorded (missed or skipped)."""
    ticks = tmp_path / "ticks.txt"

    async def slow() -> None:
        await anyio.sleep(0.1)

    declared = [spec(slow, name="t", every="0.2s", coalesce="all")]
    kernel, service = make_kernel(tmp_path)
    async with kernel:
        await service.register("p", declared)
        await wait_events(kernel, "TaskStarted")
    await anyio.sleep(2.5)  # ~12 due times pass while nothing runs
    script = tmp_path / "child.py"
    script.write_text(CATCH_UP_CHILD)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), str(ticks)], cwd=ROOT)
    try:
        with anyio.fail_after(60):
            while not (ticks.exists() and len(ticks.read_text().split()) >= 3):
                assert proc.poll() is None, "the child process died on its own"
                await anyio.sleep(0.01)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    kernel, service = make_kernel(tmp_path)
    async with kernel:
        await service.register("p", declared)
        # every due time up to the latest started one is, sooner or later, started,
        # skipped or recorded as missed (the restart resumes the catch-up)
        lost: list[int] = []
        with anyio.move_on_after(60):
            while True:
                records = await kernel.read(stream="task-p.t")
                # (a claim released at the first kernel's stop, before its instant:
                # its code never ran and its due time runs again)
                released = {r.data["run_id"] for r in records if r.type == "TaskReleased"}
                starts = [
                    r.data["scheduled_for"]
                    for r in records
                    if r.type == "TaskStarted" and r.data["run_id"] not in released
                ]
                first = min(starts)

                def step(t: float, first: float = first) -> int:
                    return round((t - first) / 0.2)

                steps = [step(t) for t in starts]
                assert len(steps) == len(set(steps)), "a due time started twice"
                covered = set(steps)
                for r in records:
                    if r.type == "TaskMissed":
                        covered.update(range(step(r.data["first"]), step(r.data["last"]) + 1))
                    elif r.type == "TaskSkipped":
                        covered.add(step(r.data["scheduled_for"]))
                lost = sorted(set(range(max(steps) + 1)) - covered)
                if not lost and max(steps) > 25:
                    break
                await anyio.sleep(0.2)
        assert not lost, f"due times neither run, skipped nor recorded as missed: {lost}"


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


async def test_a_result_the_log_cannot_encode_is_not_kept_and_the_outcome_is(
    server: Any,  # noqa: F811
) -> None:
    """Before: a return value ``json`` accepts but the log's encoder refuses (nesting of
    300 levels) or that is nested too deeply for ``json`` itself made the outcome's
    append fail: the run never got its ``TaskSucceeded``."""
    kernel, scheduler, url = server

    async def deep() -> Any:
        return _nested(300)

    async def deeper() -> Any:
        return _nested(5000)

    async def fine() -> Any:
        return {"n": 2**64, "nested": _nested(100)}

    await scheduler.register(
        "r",
        [spec(fn, name=fn.__name__, after=0) for fn in (deep, deeper, fine)],
    )
    done = await wait_events(
        kernel, "TaskSucceeded", 3, where=lambda r: r.data["task"].startswith("r.")
    )
    by_task = {r.data["task"]: r.data for r in done}
    for tid in ("r.deep", "r.deeper"):
        assert by_task[tid]["result"] is None
        assert by_task[tid]["result_error"].startswith("not JSON-serializable")
    assert by_task["r.fine"]["result"] == {"n": 2**64, "nested": _nested(100)}
    await kernel.settle()
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        r = await client.get("/admin/tasks/r.deep/runs", headers=AUTH)
        assert r.status_code == 200 and r.json()["runs"][0]["status"] == "succeeded"


async def test_runtime_arguments_the_log_cannot_encode_are_refused(server: Any) -> None:  # noqa: F811
    """Before: NaN was accepted (and read back as null after a restart); a nesting the
    log's encoder refuses passed the check, and the append of ``ScheduleAdded`` failed."""
    kernel, scheduler, url = server

    async def anyargs(*args: Any, **kwargs: Any) -> None:
        pass

    await scheduler.register("w", [spec(anyargs, every="1h")])
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        deep = "[" * 300 + "1" + "]" * 300
        for extra in (f'"args": [{deep}]', '"kwargs": {"x": NaN}'):
            r = await client.post(
                "/admin/tasks",
                headers={**AUTH, "content-type": "application/json"},
                content=f'{{"id": "w.a", "function": "anyargs", "trigger": {{"every": "1h"}}, {extra}}}',
            )
            assert r.status_code == 400 and "JSON-serializable" in r.text, (extra, r.text)
        r = await client.post(
            "/admin/tasks",
            headers=AUTH,
            json={
                "id": "w.a",
                "function": "anyargs",
                "trigger": {"every": "1h"},
                "args": [2**63 - 1],
            },
        )
        assert r.status_code == 201, r.text
    assert len(await kernel.read(types=["ScheduleAdded"])) == 1


class _Hostile(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


async def test_hostile_failures_are_recorded_and_bounded(tmp_path: Path) -> None:
    """Before: ``sys.exit()`` in an async task stopped the whole server; an exception
    whose ``__str__`` raises lost the run's outcome (the run stayed in progress); a
    message of 5 MB was recorded whole (twice, with its traceback) at every failure."""

    async def exits() -> None:
        sys.exit(3)

    def sync_exits() -> None:
        sys.exit(4)

    async def hostile() -> None:
        raise _Hostile

    def sync_hostile() -> None:
        raise _Hostile

    async def huge() -> None:
        raise ValueError("x" * 5_000_000)

    async def fine() -> None:
        pass

    fns = (exits, sync_exits, hostile, sync_hostile, huge)
    kernel, service = make_kernel(tmp_path)
    async with kernel:
        await service.register("h", [spec(fn, name=fn.__name__, after=0) for fn in fns])
        failed = {r.data["task"]: r.data for r in await wait_events(kernel, "TaskFailed", 5)}
        assert failed["h.exits"]["error"] == "SystemExit: 3"
        assert failed["h.sync_exits"]["error"] == "SystemExit: 4"
        for tid in ("h.hostile", "h.sync_hostile"):
            assert failed[tid]["error"].startswith("_Hostile: <str() of the exception failed")
        assert len(failed["h.huge"]["error"]) < 5_000
        assert len(failed["h.huge"]["traceback"]) < 40_000
        assert "more characters cut" in failed["h.huge"]["error"]
        # the server still runs tasks
        await service.register("ok", [spec(fine, after=0)])
        await wait_events(kernel, "TaskSucceeded", where=lambda r: r.data["task"] == "ok.fine")


async def test_an_async_function_behind_a_sync_wrapper_really_runs(tmp_path: Path) -> None:
    """Before: a coroutine function wrapped by a plain (sync) decorator, or a class with
    an async ``__call__``, ran in a worker thread that only created the coroutine: it
    was never awaited, and the run was recorded as succeeded."""
    ran: list[str] = []

    def logged(fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

        return wrapper

    @logged
    async def wrapped() -> str:
        ran.append(current_task().task_id)
        return "wrapped"

    class Job:
        async def __call__(self) -> str:
            await anyio.lowlevel.checkpoint()
            ran.append(current_task().task_id)
            return "callable"

    kernel, service = make_kernel(tmp_path)
    async with kernel:
        await service.register(
            "w", [spec(wrapped, name="wrapped", after=0), spec(Job(), name="job", after=0)]
        )
        done = await wait_events(kernel, "TaskSucceeded", 2)
    assert sorted(ran) == ["w.job", "w.wrapped"]
    assert sorted(r.data["result"] for r in done) == ["callable", "wrapped"]


async def test_a_retry_waiting_for_its_turn_does_not_start_once_paused(tmp_path: Path) -> None:
    """Before: a retry waiting behind a timed-out sync run (its thread still running)
    started once the thread returned, although the task had been paused meanwhile."""
    release = threading.Event()
    calls: list[int] = []

    def stuck() -> None:
        calls.append(current_task().attempt)
        release.wait(60)

    kernel, service = make_kernel(tmp_path)
    async with kernel:
        await service.register(
            "s", [spec(stuck, after=0, timeout="0.05s", retries=1, retry_delay="0.05s")]
        )
        await wait_events(kernel, "TaskFailed", where=lambda r: r.data["will_retry"])
        # the retry falls due while the first attempt's thread still runs: it waits
        await anyio.sleep(0.3)
        await kernel.append(TaskPauseRequested(task="s.stuck"), stream=stream_of("s.stuck"))
        await wait_events(kernel, "TaskPaused")
        release.set()
        skipped = await wait_events(kernel, "TaskSkipped")
        assert skipped[0].data["reason"].startswith("paused: retry run dropped")
        await kernel.settle()
        assert len(await kernel.read(types=["TaskStarted"])) == 1
    assert calls == [1]


def test_jitter_is_checked_against_the_gaps_shortened_by_daylight_saving() -> None:
    """Before: only the next ten due times were looked at: a daily cron in Paris took a
    jitter of 23.5 h (outside the ten days before a change), although the day the
    clocks go forward has 23 h between two midnights."""
    with pytest.raises(TaskDeclarationError, match="below the interval"):
        compile_spec("p", spec(job, cron="0 0 * * *", tz="Europe/Paris", jitter="23.5h"))
    with pytest.raises(TaskDeclarationError, match="below the interval"):
        compile_spec(
            "p",
            spec(job, trigger={"calendar": {"days": 1, "at": "00:30"}, "tz": "Europe/Paris"}, jitter="23.5h"),
        )  # fmt: skip
    # ... and fits below it, in any zone
    compile_spec("p", spec(job, cron="0 0 * * *", tz="Europe/Paris", jitter="22h"))
    compile_spec("p", spec(job, cron="0 0 * * *", tz="UTC", jitter="23.5h"))
    # the 30-minute shift of Lord Howe Island
    with pytest.raises(TaskDeclarationError, match="below the interval"):
        compile_spec("p", spec(job, cron="0 3 * * *", tz="Australia/Lord_Howe", jitter="23h45m"))


async def test_a_trigger_combining_thousands_of_triggers_is_refused(server: Any) -> None:  # noqa: F811
    """Before: ``{"any": [10,000 crons]}`` was accepted through the API, and each of its
    due times (every second) cost ~0.7 s on the event loop, for ever (restarts too)."""
    kernel, _, url = server
    crons = [{"cron": f"{i % 60} * * * * *"} for i in range(10_000)]
    nested = {"any": [{"any": [{"every": f"{i + j}s"} for j in range(1, 10)]} for i in range(10)]}
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        for i, trigger in enumerate(({"any": crons}, {"all": crons[:65]}, nested)):
            r = await client.post(
                "/admin/tasks",
                headers=AUTH,
                json={"id": f"web.many{i}", "function": "job", "trigger": trigger},
            )
            assert r.status_code == 400 and "at most 64" in r.json()["detail"], r.text
        ok = {"any": crons[:64]}
        r = await client.post(
            "/admin/tasks", headers=AUTH, json={"id": "web.some", "function": "job", "trigger": ok}
        )
        assert r.status_code == 201, r.text
    assert len(await kernel.read(types=["ScheduleAdded"])) == 1


async def test_a_log_holding_an_out_of_range_runtime_schedule_still_boots(tmp_path: Path) -> None:
    """A log written before out-of-range times were refused (a ``ScheduleAdded`` with
    ``at=1e308``) boots: that schedule is rejected, the plugin's tasks are scheduled."""
    kernel, service = make_kernel(tmp_path)
    async with kernel:
        for i, trigger in enumerate(({"at": 1e308}, {"every": 1e308}, {"after": 1e308})):
            await kernel.append(
                ScheduleAdded(
                    task=f"p.bad{i}",
                    plugin="p",
                    function="job",
                    trigger=trigger,
                    args=[],
                    kwargs={},
                ),
                stream=stream_of(f"p.bad{i}"),
            )
    kernel, service = make_kernel(tmp_path)
    async with kernel:
        result = await service.register("p", [spec(job, every="0.05s")])
        assert result.accepted == ["p.job"]
        assert set(result.refused) == {"p.bad0", "p.bad1", "p.bad2"}
        await wait_events(kernel, "TaskSucceeded", where=lambda r: r.data["task"] == "p.job")
