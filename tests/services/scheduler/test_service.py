"""The scheduler service on a real kernel and a real SQLite log."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from kernel.runtime import PluginRuntime
from kernel.sdk import current_task
from services.loader.events import PluginLoaded, PluginReloaded, PluginUnloaded
from services.loader.events import stream_of as plugin_stream
from services.scheduler.projection import TaskTable

from .helpers import make_kernel, spec, wait_events


async def test_interval_task_runs_with_its_context(tmp_path: Path) -> None:
    seen: list[Any] = []

    async def beat() -> None:
        seen.append(current_task())

    kernel, service = make_kernel(tmp_path)
    async with kernel:
        result = await service.register("hello", [spec(beat, every="0.05s")])
        assert result.accepted == ["hello.beat"]
        done = await wait_events(kernel, "TaskSucceeded", 3)
        started = await kernel.read(types=["TaskStarted"])
        ctx = seen[0]
        assert ctx.task_id == "hello.beat" and ctx.plugin == "hello" and ctx.attempt == 1
        assert ctx.run_id == started[0].data["run_id"] == done[0].data["run_id"]
        assert ctx.scheduled_for.timestamp() == pytest.approx(
            started[0].data["scheduled_for"], abs=1e-5
        )
        # scheduled times follow the interval exactly: each on the grid of 0.05 s from
        # the first (a loaded machine may stall the loop past a due time, which is then
        # coalesced with the next: a step of 0.1 s, still on the grid)
        dues = [r.data["scheduled_for"] for r in started[:3]]
        for a, b in itertools.pairwise(dues):
            steps = round((b - a) / 0.05)
            # times are stored to the microsecond: compare to that precision
            assert steps >= 1 and b - a == pytest.approx(steps * 0.05, abs=1e-5)
        assert started[0].data["next_run"] == pytest.approx(dues[0] + 0.05)
        assert started[0].stream == "task-hello.beat"


async def test_sync_task_runs_off_the_event_loop(tmp_path: Path) -> None:
    threads: list[str] = []

    def work() -> None:
        threads.append(threading.current_thread().name)
        assert current_task().task_id == "p.work"

    kernel, service = make_kernel(tmp_path)
    async with kernel:
        await service.register("p", [spec(work, after="0.01s")])
        await wait_events(kernel, "TaskSucceeded")
    assert threads and threads[0] != threading.main_thread().name
    assert threads[0].startswith("xcore-task")


async def test_task_log_lines_carry_the_run_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def talk() -> None:
        current_task().logger.info("hello from the task")

    kernel, service = make_kernel(tmp_path)
    with caplog.at_level(logging.INFO, logger="xcore.plugin.p"):
        async with kernel:
            await service.register("p", [spec(talk, after=0)])
            started = await wait_events(kernel, "TaskSucceeded")
    records = [r for r in caplog.records if r.getMessage() == "hello from the task"]
    assert records
    assert records[0].run_id == started[0].data["run_id"]  # type: ignore[attr-defined]
    assert records[0].task == "p.talk"  # type: ignore[attr-defined]


async def test_invalid_declarations_are_rejected_and_the_rest_is_scheduled(
    tmp_path: Path,
) -> None:
    async def ok() -> None: ...
    async def bad() -> None: ...
    async def orphan() -> None: ...

    kernel, service = make_kernel(tmp_path)
    async with kernel:
        result = await service.register(
            "plug",
            [
                spec(ok, every="1h"),
                spec(bad, cron="61 * * * *"),
                spec(orphan, every="1h", depends_on="nope.nothing"),
            ],
        )
        assert result.accepted == ["plug.ok"]
        rejected = {r.data["task"]: r.data for r in await kernel.read(types=["TaskRejected"])}
        assert rejected["plug.bad"]["plugin"] == "plug"
        assert "not a valid cron expression" in rejected["plug.bad"]["reason"]
        assert "unknown task(s) nope.nothing" in rejected["plug.orphan"]["reason"]
        assert service.is_scheduled("plug.ok") and not service.is_scheduled("plug.bad")

        strict = await service.register(
            "strict", [spec(ok, every="1h"), spec(bad, cron="* * *")], strict=True
        )
        assert strict.accepted == []
        assert "strict plugin" in strict.refused["strict.ok"]
        assert not service.is_scheduled("strict.ok")


async def test_retries_back_off_then_fail(tmp_path: Path) -> None:
    calls: list[float] = []

    async def flaky() -> None:
        calls.append(time.time())
        raise RuntimeError("boom")

    kernel, service = make_kernel(tmp_path)
    async with kernel:
        await service.register(
            "p", [spec(flaky, after=0, retries=2, retry_delay="0.05s", retry_max_delay="0.08s")]
        )
        await wait_events(kernel, "TaskFailed", 3)
        events = await kernel.read(stream="task-p.flaky")
        kinds = [r.type for r in events if r.type != "TaskScheduled"]
        assert kinds == [
            "TaskStarted", "TaskFailed", "TaskRetryScheduled",
            "TaskStarted", "TaskFailed", "TaskRetryScheduled",
            "TaskStarted", "TaskFailed",
        ]  # fmt: skip
        failed = [r.data for r in events if r.type == "TaskFailed"]
        assert [f["attempt"] for f in failed] == [1, 2, 3]
        assert [f["will_retry"] for f in failed] == [True, True, False]
        assert (
            failed[0]["error"] == "RuntimeError: boom"
            and "raise RuntimeError" in failed[0]["traceback"]
        )
        delays = [r.data["delay_s"] for r in events if r.type == "TaskRetryScheduled"]
        assert delays == [0.05, 0.08]  # doubled, then capped
        assert len({r.data["run_id"] for r in events if r.type == "TaskStarted"}) == 1
        await kernel.settle()
        row = kernel.projection(TaskTable).tasks["p.flaky"]
        assert (row.failures, row.failed_attempts, row.successes) == (1, 3, 0)


async def test_timeout_cancels_and_records_failure(tmp_path: Path) -> None:
    cancelled = asyncio.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    kernel, service = make_kernel(tmp_path)
    async with kernel:
        await service.register("p", [spec(slow, after=0, timeout="0.05s")])
        failed = await wait_events(kernel, "TaskFailed")
        assert failed[0].data["kind"] == "timeout"
        assert failed[0].data["error"] == "timed out after 0.05s"
        assert cancelled.is_set()


async def test_overlapping_run_is_skipped(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def long() -> None:
        await release.wait()

    kernel, service = make_kernel(tmp_path)
    async with kernel:
        await service.register("p", [spec(long, every="0.03s")])
        skipped = await wait_events(kernel, "TaskSkipped", 2)
        assert "max_instances (1)" in skipped[0].data["reason"]
        release.set()
        await wait_events(kernel, "TaskSucceeded")


async def test_priority_orders_runs_at_the_concurrency_limit(tmp_path: Path) -> None:
    gate = asyncio.Event()
    order: list[str] = []

    async def blocker() -> None:
        await gate.wait()

    async def low() -> None:
        order.append("low")

    async def high() -> None:
        order.append("high")

    async def mid() -> None:
        order.append("mid")

    kernel, service = make_kernel(tmp_path, max_concurrency=1)
    async with kernel:
        await service.register("p", [spec(blocker, after=0)])
        await wait_events(kernel, "TaskStarted")
        await service.register(
            "q",
            [
                spec(low, after=0.01, priority=0),
                spec(mid, after=0.03, priority=5),
                spec(high, after=0.02, priority=5),
            ],
        )
        with anyio.fail_after(5):
            while service._runner.slots.waiting < 3:
                await anyio.sleep(0.01)
        gate.set()
        await wait_events(kernel, "TaskSucceeded", 4)
        # highest priority first; equal priorities in order of due time
        assert order == ["high", "mid", "low"]


async def test_dependency_triggered_task_follows_success(tmp_path: Path) -> None:
    script: list[Exception | None] = [None, RuntimeError("no"), None]
    calls = 0
    parked = asyncio.Event()
    reports: list[str] = []

    async def collect() -> None:
        nonlocal calls
        calls += 1
        if calls > len(script):
            await parked.wait()  # later runs never finish: exactly three outcomes
        exc = script[calls - 1]
        if exc is not None:
            raise exc

    async def report() -> None:
        reports.append(current_task().run_id)

    async def audit() -> None:
        reports.append("audit")

    kernel, service = make_kernel(tmp_path)
    async with kernel:
        result = await service.register(
            "jobs",
            [
                spec(collect, every="0.05s"),
                spec(report, depends_on="collect"),
                spec(audit, depends_on="collect", depends_rule="finished"),
            ],
        )
        assert sorted(result.accepted) == ["jobs.audit", "jobs.collect", "jobs.report"]
        # collect: success, failure, success -> report twice, audit three times
        await wait_events(
            kernel, "TaskSucceeded", 3, where=lambda r: r.data["task"] == "jobs.audit"
        )
        await wait_events(
            kernel, "TaskSucceeded", 2, where=lambda r: r.data["task"] == "jobs.report"
        )
        await service.unregister("jobs")
        report_runs = await kernel.read(stream="task-jobs.report", types=["TaskStarted"])
        assert len(report_runs) == 2
        assert all(r.data["trigger"] == "dependency" for r in report_runs)
        assert reports.count("audit") == 3


async def test_scheduled_task_with_unsatisfied_dependency_is_skipped(tmp_path: Path) -> None:
    async def never() -> None: ...
    async def child() -> None: ...

    kernel, service = make_kernel(tmp_path)
    async with kernel:
        await service.register(
            "d", [spec(never, every="1h"), spec(child, every="0.02s", depends_on="never")]
        )
        skipped = await wait_events(kernel, "TaskSkipped")
        assert skipped[0].data["reason"] == "dependency d.never has not run yet"


async def test_plugin_events_schedule_reload_and_unload(tmp_path: Path) -> None:
    started = asyncio.Event()
    calls: list[int] = []

    async def slow() -> None:
        started.set()
        await asyncio.sleep(30)

    async def tick() -> None:
        calls.append(1)

    def runtime(gen: int) -> PluginRuntime:
        return PluginRuntime(
            name="plug",
            generation=gen,
            version="1.0",
            mode="trusted",
            prefix=None,
            router=None,
            tasks={"slow": spec(slow, after=0), "tick": spec(tick, every="1h")},
        )

    def loaded(gen: int) -> PluginLoaded:
        return PluginLoaded(
            name="plug", version="1.0", generation=gen, mode="trusted", prefix=None,
            routes=[], tasks=["slow", "tick"], digest="x", duration_ms=1.0,
        )  # fmt: skip

    kernel, service = make_kernel(tmp_path)
    async with kernel:
        kernel.plugins.put(runtime(1))
        await kernel.append(loaded(1), stream=plugin_stream("plug"))
        await wait_events(kernel, "TaskScheduled", 2)
        await kernel.settle()
        next_tick = kernel.projection(TaskTable).tasks["plug.tick"].next_run
        with anyio.fail_after(5):
            await started.wait()

        # reload: generation 2 replaces 1; the schedule (next run) is kept
        kernel.plugins.put(runtime(2))
        await kernel.append(loaded(2), stream=plugin_stream("plug"))
        await kernel.append(PluginUnloaded(name="plug", generation=1), stream=plugin_stream("plug"))
        await kernel.append(
            PluginReloaded(
                name="plug", version="1.0", old_generation=1, generation=2, duration_ms=1
            ),
            stream=plugin_stream("plug"),
        )
        cancelled = await wait_events(kernel, "TaskFailed")
        assert cancelled[0].data["kind"] == "cancelled"
        assert "generation 1 was unloaded" in cancelled[0].data["error"]
        await wait_events(
            kernel,
            "TaskScheduled",
            1,
            where=lambda r: r.data["generation"] == 2 and r.data["task"] == "plug.tick",
        )
        await kernel.settle()
        row = kernel.projection(TaskTable).tasks["plug.tick"]
        assert row.generation == 2 and row.next_run == next_tick
        assert service.is_scheduled("plug.tick")

        await kernel.append(PluginUnloaded(name="plug", generation=2), stream=plugin_stream("plug"))
        await wait_events(kernel, "TaskUnscheduled", 2, where=lambda r: r.data["generation"] == 2)
        assert not service.is_scheduled("plug.tick")


async def test_restart_resumes_from_the_log_with_misfire_policies(tmp_path: Path) -> None:
    async def once() -> None: ...
    async def skip() -> None: ...

    specs = [
        spec(once, every="0.1s", misfire="run_once", misfire_grace="0.05s"),
        spec(skip, every="0.1s", misfire="skip", misfire_grace=0),
    ]
    kernel, service = make_kernel(tmp_path)
    async with kernel:
        await service.register("m", specs)
        await wait_events(kernel, "TaskSucceeded", 2, where=lambda r: r.data["task"] == "m.once")
    before = len(await kernel_events(tmp_path))
    await anyio.sleep(0.6)  # about six due times pass while nothing runs

    kernel, service = make_kernel(tmp_path)
    async with kernel:
        await service.register("m", specs)
        # (on a loaded machine the first process may have missed runs too: only the
        # events of this process count)
        by_task = {
            name: (
                await wait_events(
                    kernel,
                    "TaskMissed",
                    where=lambda r, n=name: r.position > before and r.data["task"] == n,
                )
            )[0].data
            for name in ("m.once", "m.skip")
        }
        assert by_task["m.once"]["count"] >= 4 and by_task["m.once"]["policy"] == "run_once"
        assert by_task["m.skip"]["count"] >= 5 and by_task["m.skip"]["policy"] == "skip"
        runs = await wait_events(
            kernel,
            "TaskStarted",
            1,
            where=lambda r: r.data["trigger"] == "misfire" and r.position > before,
        )
        assert {r.data["task"] for r in runs} == {"m.once"}
        # no TaskScheduled again: the schedule came from the log
        scheduled = await kernel.read(types=["TaskScheduled"])
        assert len(scheduled) == 2
        all_started = await kernel.read(types=["TaskStarted"])
        dues = [(r.data["task"], r.data["scheduled_for"]) for r in all_started]
        assert len(dues) == len(set(dues))  # nothing ran twice
    assert before > 0


async def kernel_events(tmp_path: Path) -> list[Any]:
    from kernel import SQLiteStore

    store = SQLiteStore(tmp_path / "events.db")
    await store.open()
    try:
        return await store.read()
    finally:
        await store.close()


async def test_pause_and_resume_survive_a_restart(tmp_path: Path) -> None:
    from services.scheduler.events import TaskPauseRequested, TaskResumeRequested

    async def tick() -> None: ...

    kernel, service = make_kernel(tmp_path)
    async with kernel:
        await service.register("p", [spec(tick, every="0.05s")])
        outcome = await kernel.request(
            TaskPauseRequested(task="p.tick"), stream="task-p.tick", outcomes=["TaskPaused"]
        )
        assert outcome.type == "TaskPaused"
    kernel, service = make_kernel(tmp_path)
    async with kernel:
        await service.register("p", [spec(tick, every="0.05s")])
        count = len(await kernel.read(types=["TaskStarted"]))
        await anyio.sleep(0.2)
        assert len(await kernel.read(types=["TaskStarted"])) == count  # still paused
        await kernel.request(
            TaskResumeRequested(task="p.tick"), stream="task-p.tick", outcomes=["TaskResumed"]
        )
        await wait_events(kernel, "TaskStarted", count + 1)


async def test_many_schedules_each_fire_once(tmp_path: Path) -> None:
    hits: dict[str, int] = {}

    def make(i: int) -> Any:
        async def fn() -> None:
            hits[f"t{i}"] = hits.get(f"t{i}", 0) + 1

        fn.__name__ = f"t{i}"
        return fn

    kernel, service = make_kernel(tmp_path, max_concurrency=64)
    async with kernel:
        await service.register(
            "many", [spec(make(i), after=0.2 + (i % 50) / 100) for i in range(1000)]
        )
        await wait_events(kernel, "TaskSucceeded", 1000, timeout=30)
    assert len(hits) == 1000 and set(hits.values()) == {1}


async def test_start_is_durable_before_the_code_and_never_early(tmp_path: Path) -> None:
    """Runs due at the same instant share the precise wait; none starts before its due
    time, and each finds its ``TaskStarted`` in the log when its code runs."""
    checks: list[tuple[bool, bool]] = []
    kernel, service = make_kernel(tmp_path)

    def make(i: int) -> Any:
        async def fn() -> None:
            now = time.time()
            ctx = current_task()
            logged = await kernel.read(stream=f"task-p.t{i}")
            durable = any(
                r.type == "TaskStarted" and r.data["run_id"] == ctx.run_id for r in logged
            )
            checks.append((durable, now >= ctx.scheduled_for.timestamp()))

        fn.__name__ = f"t{i}"
        return fn

    async with kernel:
        await service.register("p", [spec(make(i), every="0.05s") for i in range(5)])
        await wait_events(kernel, "TaskSucceeded", 25)
    assert len(checks) >= 25
    assert all(durable for durable, _ in checks)
    assert all(on_time for _, on_time in checks)


async def test_a_run_cancelled_after_its_code_returned_keeps_its_outcome(
    tmp_path: Path,
) -> None:
    kernel, service = make_kernel(tmp_path)

    async def quick() -> None:
        # The cancel lands after the code has returned, before the outcome is recorded
        # (while the run lets the other runs of its instant start).
        loop = asyncio.get_running_loop()
        loop.call_soon(service._runner.cancel_runs, "p", None, "cancelled: test")

    async with kernel:
        await service.register("p", [spec(quick, after=0)])
        done = await wait_events(kernel, "TaskSucceeded")
        failed = await kernel.read(types=["TaskFailed"])
    assert done[0].data["task"] == "p.quick"
    assert failed == []
