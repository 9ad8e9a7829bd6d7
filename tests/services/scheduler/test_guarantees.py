"""The guarantees that broke in the first round, each with the test that failed then."""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import anyio
import pytest

from kernel import Kernel, Settings
from services.scheduler.events import (
    TaskFailed,
    TaskRetryScheduled,
    TaskRunRequested,
    TaskScheduled,
    TaskStarted,
    stream_of,
)
from services.scheduler.service import SchedulerService
from tests.services.loader.conftest import Harness, write_plugin

from .helpers import make_kernel, spec, wait_events


async def test_max_instances_counts_a_timed_out_sync_run_until_its_code_returns(
    tmp_path: Path,
) -> None:
    release = threading.Event()
    lock = threading.Lock()
    now_running = [0]
    most = [0]

    def slow() -> None:
        with lock:
            now_running[0] += 1
            most[0] = max(most[0], now_running[0])
        try:
            release.wait(30)
        finally:
            with lock:
                now_running[0] -= 1

    kernel, service = make_kernel(tmp_path)
    try:
        async with kernel:
            await service.register(
                "p", [spec(slow, every="0.05s", timeout="0.02s", max_instances=1)]
            )
            await wait_events(kernel, "TaskFailed", where=lambda r: r.data["kind"] == "timeout")
            # the run timed out for the log, but its thread still runs: the next due
            # runs are skipped, not started beside it
            skipped = await wait_events(kernel, "TaskSkipped", 3)
            assert all("max_instances" in r.data["reason"] for r in skipped)
            assert len(await kernel.read(types=["TaskStarted"])) == 1
            assert service.running("p.slow") == 1
            release.set()
            with anyio.fail_after(10):
                while service.running("p.slow") != 0:
                    await anyio.sleep(0.01)
            # the thread returned: runs start again
            await wait_events(kernel, "TaskStarted", 2)
    finally:
        release.set()
    assert most[0] == 1


async def test_a_cron_that_can_never_fire_is_rejected_and_the_rest_scheduled(
    tmp_path: Path,
) -> None:
    async def never() -> None: ...
    async def fine() -> None: ...
    async def after_never() -> None: ...

    kernel, service = make_kernel(tmp_path)
    async with kernel:
        result = await service.register(
            "p",
            [
                spec(never, cron="0 0 30 2 *"),
                spec(fine, cron="0 0 29 2 *"),  # leap years only: it does fire
                spec(after_never, depends_on="never"),
            ],
        )
        assert result.accepted == ["p.fine"]
        assert "never fires" in result.refused["p.never"]
        assert "refused task(s) p.never" in result.refused["p.after_never"]
        rejected = {r.data["task"] for r in await kernel.read(types=["TaskRejected"])}
        assert rejected == {"p.never", "p.after_never"}
        assert not await kernel.read(types=["SubscriberFailed"])


@pytest.mark.parametrize("where", ["same-plugin", "cross-plugin"])
async def test_a_dependency_between_retries_has_not_succeeded(tmp_path: Path, where: str) -> None:
    calls = [0]

    async def dep() -> None:
        calls[0] += 1
        if calls[0] > 1:
            raise RuntimeError("dependency broken")

    async def child() -> None: ...

    kernel, service = make_kernel(tmp_path)
    dep_spec = spec(
        dep, every="1h", retries=3, retry_delay="0.2s", retry_max_delay="0.2s", name="dep"
    )
    async with kernel:
        if where == "same-plugin":
            await service.register("p", [dep_spec, spec(child, every="0.03s", depends_on="dep")])
            child_id = "p.child"
        else:
            await service.register("p", [dep_spec])
            await service.register("q", [spec(child, every="0.03s", depends_on="p.dep")])
            child_id = "q.child"
        await kernel.append(TaskRunRequested(task="p.dep"), stream=stream_of("p.dep"))
        await wait_events(kernel, "TaskSucceeded", where=lambda r: r.data["task"] == child_id)
        # the dependency now fails, and is retried three times
        await kernel.append(TaskRunRequested(task="p.dep"), stream=stream_of("p.dep"))
        first_failure = await wait_events(kernel, "TaskFailed")
        assert first_failure[0].data["will_retry"]
        final = await wait_events(
            kernel, "TaskFailed", where=lambda r: not r.data["will_retry"], timeout=20
        )
        await wait_events(
            kernel,
            "TaskSkipped",
            where=lambda r: r.position > final[0].position and r.data["task"] == child_id,
        )
        # No child run decided after the failure: a run whose due time is past the
        # failure (plus its lead, when the dependency check happens) never started. (One
        # decided just before may record its start just after, on a loaded machine.)
        failed_at = first_failure[0].timestamp
        child_starts = [
            r
            for r in await kernel.read(types=["TaskStarted"])
            if r.data["task"] == child_id and r.data["scheduled_for"] > failed_at + 0.05
        ]
        assert child_starts == []
        reasons = {
            r.data["reason"]
            for r in await kernel.read(types=["TaskSkipped"])
            if r.data["task"] == child_id and r.position > first_failure[0].position
        }
        assert any("retry is pending" in x for x in reasons), reasons


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"every": "1s", "jitter": "1s"}, "jitter (1s) must be below the interval between runs"),
        ({"every": "10s", "jitter": "30s"}, "jitter (30s) must be below"),
        ({"cron": "* * * * *", "jitter": "60s"}, "jitter (60s) must be below"),
        ({"every": "5ms"}, "every: 0.005s is below the minimum of 0.01s"),
        ({"every": "1h", "retries": 2, "retry_delay": 0}, "retry_delay: 0s is below the minimum"),
        ({"every": "1h", "timeout": "1ms"}, "timeout: 0.001s is below the minimum"),
        (
            {"every": "1h", "retries": 1, "retry_delay": "10s", "retry_max_delay": "1s"},
            "retry_max_delay (1s) is below retry_delay (10s)",
        ),
    ],
)
async def test_durations_are_bounded_from_below_and_jitter_by_the_interval(
    tmp_path: Path, options: dict[str, object], message: str
) -> None:
    async def work() -> None: ...

    kernel, service = make_kernel(tmp_path)
    async with kernel:
        result = await service.register("p", [spec(work, **options)])
        assert result.accepted == []
        assert message in result.refused["p.work"], result.refused
        [rejected] = await kernel.read(types=["TaskRejected"])
        assert message in rejected.data["reason"]


async def test_boot_after_15_hours_down_does_not_stall_the_loop(tmp_path: Path) -> None:
    """1,000 per-minute crons whose next run is 15 h old: the catch-up at boot (one
    coalesced run each) leaves the event loop free between short slices."""

    async def work() -> None: ...

    specs = [spec(work, name=f"c{i}", cron="* * * * *", tz="Europe/Paris") for i in range(1000)]
    # a log as a process down for 15 h left it: each task scheduled, next run 15 h ago
    settings = Settings(data_dir=tmp_path, node="test")
    async with Kernel(settings) as kernel:
        past = (int(time.time()) // 60) * 60 - 15 * 3600
        trigger = "cron '* * * * *' Europe/Paris"
        for i in range(0, 1000, 100):
            await asyncio.gather(
                *(
                    kernel.append(
                        TaskScheduled(
                            task=f"p.c{j}", plugin="p", generation=0, trigger=trigger, next_run=past
                        ),
                        stream=stream_of(f"p.c{j}"),
                    )
                    for j in range(i, i + 100)
                )
            )
    gaps: list[float] = []
    kernel, service = make_kernel(tmp_path)
    async with kernel:
        stop = asyncio.Event()

        async def probe() -> None:
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        prober = asyncio.create_task(probe())
        await service.register("p", specs)
        # (watch the task table, not the log: reading thousands of events every few ms
        # would be the test's own stall)
        with anyio.fail_after(120):
            while sum(row.successes for row in service.table.tasks.values()) < 1000:
                await anyio.sleep(0.05)
        stop.set()
        await prober
        missed = await kernel.read(types=["TaskMissed"])
        assert len(missed) == 1000
    # counted exactly, every task: one per minute from 15 h ago to the latest due time
    # (the run of which is the coalesced one)
    for r in missed:
        assert r.data["first"] == past and r.data["count"] >= 15 * 60
        assert r.data["count"] == (r.data["last"] - r.data["first"]) / 60
    # The loop kept turning: the largest gap is one slice of work (a batch of appends,
    # a GC pass), not the whole catch-up — ~30 s on this test's machine before (a
    # per-run count and no slices), ~0.1 s idle and up to ~1.5 s with the machine at a
    # load of 9 on 2 cores after. The bound is generous on purpose: slow is not stuck.
    assert max(gaps) < 5.0, max(gaps)


async def test_duplicate_task_names_in_a_plugin_are_rejected(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    write_plugin(
        plugins,
        "dups",
        info={"version": "1.0.0"},
        run="""
            from kernel.sdk import task

            @task(every="1h", name="job")
            def one():
                pass

            @task(every="2h", name="job")
            def two():
                pass

            @task(every="1h")
            def other():
                pass

            alias = other  # the same declaration under two names is one task
        """,
    )
    scheduler = SchedulerService()
    h = Harness(tmp_path, plugins, services_extra=[scheduler])
    with anyio.fail_after(30):
        await h.start()
    try:
        await wait_events(h.kernel, "TaskScheduled")
        rejected = await wait_events(h.kernel, "TaskRejected")
        assert [r.data["task"] for r in rejected] == ["dups.job"]
        assert "declared 2 times" in rejected[0].data["reason"]
        assert scheduler.is_scheduled("dups.other") and not scheduler.is_scheduled("dups.job")
    finally:
        with anyio.fail_after(30):
            await h.stop()


async def test_a_coalesced_run_and_a_retry_due_at_the_same_instant_both_run(
    tmp_path: Path,
) -> None:
    ran: list[tuple[str, int]] = []

    async def work() -> None:
        from kernel.sdk import current_task

        ctx = current_task()
        ran.append((ctx.run_id, ctx.attempt))
        await asyncio.sleep(0.05)

    # the log of a process that died with a retry pending and runs missed (three, to
    # be coalesced into one), the retry and the first missed run due at the same instant
    settings = Settings(data_dir=tmp_path, node="test")
    t = time.time() - 150
    async with Kernel(settings) as kernel:
        sid = stream_of("p.work")
        await kernel.append(
            TaskScheduled(task="p.work", plugin="p", generation=0, trigger="every 60s", next_run=t),
            stream=sid,
        )
        await kernel.append(
            [
                TaskStarted(task="p.work", run_id="r1", scheduled_for=t - 60, next_run=t),
                TaskFailed(task="p.work", run_id="r1", attempt=1, error="boom", will_retry=True),
                TaskRetryScheduled(
                    task="p.work",
                    run_id="r1",
                    attempt=2,
                    delay_s=60,
                    retry_at=t,
                    scheduled_for=t - 60,
                ),
            ],
            stream=sid,
        )
    kernel, service = make_kernel(tmp_path)
    async with kernel:
        await service.register("p", [spec(work, every="60s", retries=1, misfire="run_once")])
        await wait_events(kernel, "TaskSucceeded", 2)
        started = [
            r
            for r in await kernel.read(types=["TaskStarted"], stream=stream_of("p.work"))
            if r.data["run_id"] != "r1" or r.data["attempt"] == 2
        ]
        assert not await kernel.read(types=["TaskSkipped"])
        [missed] = await kernel.read(types=["TaskMissed"])
        assert missed.data["count"] == 2
    # both honoured, in order: the retry of the earlier run, then the coalesced run
    assert [r.data["trigger"] for r in started] == ["retry", "misfire"]
    assert ran[0] == ("r1", 2) and ran[1][1] == 1


async def test_the_outcome_records_the_real_start_and_lateness(tmp_path: Path) -> None:
    async def work() -> str:
        await asyncio.sleep(0.01)
        return "ok"

    kernel, service = make_kernel(tmp_path)
    async with kernel:
        await service.register("p", [spec(work, every="0.1s")])
        [done, *_] = await wait_events(kernel, "TaskSucceeded")
        [started, *_] = await kernel.read(types=["TaskStarted"])
        d = done.data
        assert d["started_at"] >= started.data["scheduled_for"]
        assert d["lateness_ms"] == pytest.approx(
            (d["started_at"] - started.data["scheduled_for"]) * 1000, abs=0.01
        )
        # TaskStarted is written ahead of the start; the outcome says when it really was
        assert started.timestamp <= d["started_at"]
        await kernel.settle()
        row = service.table.tasks["p.work"].summary()
        assert row["last_lateness_ms"] == d["lateness_ms"]
        assert row["max_lateness_ms"] is not None and row["mean_lateness_ms"] is not None


async def test_the_gc_policy_freezes_after_registrations_and_thaws_for_the_next(
    tmp_path: Path,
) -> None:
    import gc

    async def work() -> None: ...

    threshold = gc.get_threshold()
    kernel, service = make_kernel(tmp_path)
    async with kernel:
        service._gc.settle = 0.05
        service._gc.idle_tick = 0  # (idle, CPython's threshold is young_batch)
        await service.register("p", [spec(work, every="1h")])
        with anyio.fail_after(10):
            while service._gc.freezes < 1:
                await anyio.sleep(0.01)
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold()[0] >= 10_000
        # registered again (a reload): its old objects may be garbage, so it thaws (a
        # first registration does not: see the test below)
        await service.register("p", [spec(work, every="2h")])
        assert gc.get_freeze_count() == 0
        with anyio.fail_after(10):
            while service._gc.freezes < 2:
                await anyio.sleep(0.01)
    # stopped: the collector has its defaults back
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == threshold


async def test_the_gc_policy_collects_nothing_for_an_application_that_disabled_gc(
    tmp_path: Path,
) -> None:
    """``gc.disable()`` before the kernel: the application collects when it chooses (or
    never); the policy runs no collection of its own — not even the full one of a settle
    after a registration thawed the heap — and freezes nothing its own ``gc.collect()``
    calls could then never free."""
    import gc

    async def work() -> None: ...

    kernel, service = make_kernel(tmp_path)
    gc.disable()
    try:
        async with kernel:
            policy = service._gc
            policy.settle = 0.05
            for name in ("p", "q", "r"):
                full = gc.get_stats()[2]["collections"]
                await service.register(name, [spec(work, every="1h")])
                with anyio.fail_after(30):
                    while policy._task is not None and not policy._task.done():
                        await anyio.sleep(0.01)
                assert gc.get_stats()[2]["collections"] == full
                assert gc.get_freeze_count() == 0
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


async def test_a_new_plugins_registration_thaws_nothing_a_plugin_registered_again_does(
    tmp_path: Path,
) -> None:
    """Registering a plugin for the first time frees nothing, so the heap frozen at the
    last settle stays frozen and the next settle does not collect it (with 10,000
    schedules registered plugin by plugin, a settle between two of them made the next
    one collect the whole heap: 1.9 s on a loaded machine, among the first bursts); it
    collects what was made since (the new plugin's garbage: frozen, it stayed for good).
    A plugin registered again may leave garbage among the frozen objects: that thaws,
    and the next settle collects it."""
    import gc

    async def work() -> None: ...

    kernel, service = make_kernel(tmp_path)
    async with kernel:
        policy = service._gc
        policy.settle = 0.05

        async def settled() -> None:
            with anyio.fail_after(30):
                while policy._task is not None and not policy._task.done():
                    await anyio.sleep(0.01)

        await service.register("p", [spec(work, every="1h")])
        await settled()
        frozen = gc.get_freeze_count()
        assert policy.freezes >= 1 and frozen > 0
        full = gc.get_stats()[2]["collections"]

        class Garbage:
            me: Any = None

        garbage = Garbage()  # a new plugin's import garbage: a cycle nothing refers to
        garbage.me = garbage
        gone = weakref.ref(garbage)
        del garbage
        await service.register("q", [spec(work, every="1h")])  # a new plugin
        assert gc.get_freeze_count() > frozen // 2 and not policy._thawed
        await settled()
        # what was frozen stays frozen (the settle's collection walks only the objects
        # made since: not the whole heap), and the new garbage is collected, not frozen
        assert gc.get_freeze_count() > frozen // 2
        assert gone() is None
        await service.register("p", [spec(work, every="2h")])  # registered again
        assert policy._thawed and gc.get_freeze_count() == 0
        await settled()
        assert gc.get_stats()[2]["collections"] > full  # its garbage collected
        assert gc.get_freeze_count() > 0
