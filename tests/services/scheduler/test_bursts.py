"""Runs due at one instant start as one batch: one timer, one store call for their
start records, one for their outcomes (which wait for the starts being written)."""

from __future__ import annotations

import asyncio
import functools
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

from services.scheduler import runner as runner_module
from services.scheduler.events import TaskStarted, TaskSucceeded, stream_of
from services.scheduler.timers import TimerQueue
from tests.services.scheduler.helpers import make_kernel, spec, wait_events

N = 40


async def test_runs_due_at_one_instant_claim_and_record_in_one_store_call_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # every due callback in one loop step, whatever the machine's speed
    monkeypatch.setattr(TimerQueue, "slice", 60.0)
    kernel, service = make_kernel(tmp_path, max_concurrency=N)
    ran: list[str] = []

    async def work() -> None:
        ran.append("x")

    at = datetime.fromtimestamp(time.time() + 1.5, UTC).isoformat()
    async with kernel:
        await service.register("p", [spec(work, name=f"t{i}", at=at) for i in range(N)])
        runner = service._runner
        assert runner.claims is not None and runner.outcomes is not None
        claims0, outcomes0 = runner.claims.batches, runner.outcomes.batches
        await wait_events(kernel, "TaskSucceeded", N)
        assert runner.claims.batches - claims0 == 1  # one append_many for N starts
        # and their outcomes in one or two (not one per run): on a loaded machine the
        # runs of one instant may resume over two loop steps (some after the gate, some
        # straight from a claim that committed after the instant); seen once on 3.13
        assert 1 <= runner.outcomes.batches - outcomes0 <= 2
        for i in range(N):  # each stream: its start, then its outcome
            types = [r.type for r in await kernel.read(stream=stream_of(f"p.t{i}"))]
            assert types[-2:] == ["TaskStarted", "TaskSucceeded"]
    assert len(ran) == N


async def test_the_claims_of_one_instant_are_one_batch_however_many_slices_fire_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the timer serves the loop after every callback: the runs' claims are queued over
    # N loop steps, and still go to the store in one append_many (the timer holds the
    # claims' batch while it fires one instant, up to hold_max: here, whatever it takes)
    monkeypatch.setattr(TimerQueue, "slice", 0.0)
    monkeypatch.setattr(TimerQueue, "hold_max", 60.0)
    kernel, service = make_kernel(tmp_path, max_concurrency=N)

    async def work() -> None:
        pass

    at = datetime.fromtimestamp(time.time() + 1.5, UTC).isoformat()
    async with kernel:
        await service.register("p", [spec(work, name=f"t{i}", at=at) for i in range(N)])
        runner = service._runner
        assert runner.claims is not None
        claims0 = runner.claims.batches
        await wait_events(kernel, "TaskSucceeded", N)
        assert runner.claims.batches - claims0 == 1


async def test_a_huge_instant_sends_its_claims_every_hold_max(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a hold bounded by hold_max: with 0 (flush at every slice) the runs of one
    # instant claim in several batches, so the first runs of 10,000 due at once do not
    # wait for the last one's callback
    monkeypatch.setattr(TimerQueue, "slice", 0.0)
    monkeypatch.setattr(TimerQueue, "hold_max", 0.0)
    kernel, service = make_kernel(tmp_path, max_concurrency=N)

    async def work() -> None:
        pass

    at = datetime.fromtimestamp(time.time() + 1.5, UTC).isoformat()
    async with kernel:
        await service.register("p", [spec(work, name=f"t{i}", at=at) for i in range(N)])
        runner = service._runner
        assert runner.claims is not None
        claims0 = runner.claims.batches
        await wait_events(kernel, "TaskSucceeded", N)
        assert runner.claims.batches - claims0 > 1
        assert len(await kernel.read(types=["TaskStarted"])) == N  # each run once


async def test_held_batches_are_sent_at_the_release_and_by_drain(tmp_path: Path) -> None:
    kernel, service = make_kernel(tmp_path)
    async with kernel:
        runner = service._runner
        claims = runner.claims
        assert claims is not None
        now = time.time()

        def start(i: int) -> asyncio.Future[Any]:
            return claims.claim(
                stream_of(f"p.h{i}"),
                [TaskStarted(task=f"p.h{i}", run_id=f"r{i}", scheduled_for=now, attempt=1)],
                f"{i:032d}",
                None,
            )

        claims.hold()
        first = start(0)
        for _ in range(5):
            await asyncio.sleep(0)
        assert not first.done() and claims.batches == 0  # held: nothing sent
        claims.release()
        with anyio.fail_after(30):
            await first
        assert claims.batches == 1
        claims.hold()
        second = start(1)
        with anyio.fail_after(30):
            await claims.drain(timeout=30)  # a stop writes what is held
        assert second.done() and claims.batches == 2
        claims.release()
        with pytest.raises(RuntimeError):
            claims.release()


async def test_outcomes_wait_for_the_starts_being_claimed(tmp_path: Path) -> None:
    kernel, service = make_kernel(tmp_path)
    async with kernel:
        runner = service._runner
        assert runner.claims is not None and runner.outcomes is not None
        now = time.time()
        # queued first, in the same loop step: the outcome still commits after the start
        outcome = runner.outcomes.record(
            stream_of("p.a"),
            [TaskSucceeded(task="p.a", run_id="r0", attempt=1, duration_ms=1.0)],
        )
        start = runner.claims.claim(
            stream_of("p.b"),
            [TaskStarted(task="p.b", run_id="r1", scheduled_for=now, attempt=1)],
            "b" * 32,
            None,
        )
        with anyio.fail_after(30):
            [done] = await outcome
            [started] = await start
        assert started.position < done.position


def _fire(fired: list[tuple[str, float]], key: str) -> None:
    fired.append((key, time.time()))


async def test_early_timers_fire_the_lead_they_find_when_they_sleep() -> None:
    lead = [0.0]
    timer = TimerQueue(lead=lambda: lead[0])
    fired: list[tuple[str, float]] = []
    timer.start()
    try:
        when = time.time() + 6.0
        for key in ("a", "b", "c", "d"):
            timer.arm(key, when, functools.partial(_fire, fired, key), early=True)
        timer.cancel("c")
        timer.arm("d", when + 3600, lambda: fired.append(("late", time.time())), early=True)
        timer.arm("b", when, lambda: fired.append(("b2", time.time())), early=True)
        assert len(timer) == 3
        # armed with no lead; the lead grows to 5 s: they fire ~1 s from now, not ~6 s
        lead[0] = 5.0
        timer.lead_changed()
        with anyio.fail_after(30):
            while len(fired) < 2:
                await asyncio.sleep(0.01)
        assert [k for k, _ in fired] == ["a", "b2"]  # one instant: in arming order
        assert all(t < when - 2.5 for _, t in fired)
        assert timer.when("d") == pytest.approx(when + 3600 - 5.0)
    finally:
        await timer.stop()


def armed_for(service: Any, tid: str) -> tuple[float, float]:
    """When the timer of task ``tid`` fires next, and the due time it fires for."""
    when = service._dispatch._timer.when(tid)
    due = service._dispatch.tasks[tid].next_due
    assert when is not None and due is not None
    return when, due


async def test_the_lead_starts_at_its_maximum(tmp_path: Path) -> None:
    # the first burst after boot (every schedule armed at once) is the slowest: until
    # starts have been seen, timers fire the whole max_lead_ms ahead
    kernel, service = make_kernel(tmp_path, max_lead_ms=40)
    async with kernel:
        assert service._runner.lead == pytest.approx(0.040)
        when = time.time() + 3600
        service._dispatch._timer.arm("probe", when, lambda: None, early=True)
        assert service._dispatch._timer.when("probe") == pytest.approx(when - 0.040)


async def test_the_lead_keeps_a_margin_for_the_machines_pauses(tmp_path: Path) -> None:
    # however fast the recent ways were, the lead stays lead_margin_ms above twice the
    # slowest of them: the machine may pause the process for that long mid-way (a
    # learnt peak alone decays to ~twice the fastest way, and a 20 ms pause then makes
    # the whole burst late); the GC policy's deadline leaves the margin whole
    kernel, service = make_kernel(tmp_path, max_lead_ms=500, lead_margin_ms=25)
    async with kernel:
        runner = service._runner
        for _ in range(20_000):
            runner._note_append(0.0005)  # fast ways: the learnt peak decays to them
        assert runner.way == pytest.approx(0.0005, abs=1e-4)
        assert runner.lead == pytest.approx(2 * runner.way + 0.025)
        when = time.time() + 3600
        service._dispatch._timer.arm("probe", when, lambda: None, early=True)
        assert service._dispatch._timer.when("probe") == pytest.approx(when - runner.lead)
        # the GC policy may pause until the way must begin, the margin kept before it
        deadline = service._dispatch.next_deadline()
        assert deadline is not None
        assert deadline == pytest.approx(when - runner.way - 0.025)
        # a slow way raises the lead, up to max_lead_ms
        runner._note_append(0.4)
        assert runner.lead == pytest.approx(0.5)


async def test_a_short_interval_fires_at_most_half_a_period_ahead(tmp_path: Path) -> None:
    # with the lead (25 ms) ahead of a 20 ms interval, the next run's timer would fire
    # before the run before it reached its instant, and find it in progress
    kernel, service = make_kernel(tmp_path, max_lead_ms=25)

    async def work() -> None:
        pass

    async with kernel:
        await service.register("p", [spec(work, name="fast", every="20ms")])
        assert service._runner.lead == pytest.approx(0.025)
        when, due = armed_for(service, "p.fast")
        assert when >= due - 0.010 - 1e-6


async def test_while_frozen_the_young_collections_wait_for_a_gap_between_due_times(
    tmp_path: Path,
) -> None:
    import gc

    async def work() -> None: ...

    kernel, service = make_kernel(tmp_path)
    async with kernel:
        policy = service._gc
        policy.settle, policy.tick = 0.05, 0.01
        policy.idle_tick = 0  # (its 10 ms pace, CPython's threshold the overdue one)
        await service.register("p", [spec(work, every="1h")])
        with anyio.fail_after(10):
            while policy.freezes < 1:
                await anyio.sleep(0.01)
        # the young collections are the policy's now: CPython's own threshold is raised
        # to the overdue one (it still collects when far overdue, the loop held or not)
        assert policy._young is not None
        assert gc.get_threshold()[0] == policy.overdue * policy._young
        policy._quiet_for = lambda: 0.0  # a start window is always open (a burst near)
        threshold = policy._young
        kept = [[] for _ in range(threshold * 2)]  # a collection is due, not overdue
        await anyio.sleep(0.3)
        assert policy.collections == [0, 0, 0]
        policy._quiet_for = lambda: float("inf")  # a gap: it collects
        with anyio.fail_after(10):
            while sum(policy.collections) < 1:
                await anyio.sleep(0.01)
        policy._quiet_for = lambda: 0.0
        done = sum(policy.collections)
        automatic = gc.get_stats()[0]["collections"]
        kept += [[] for _ in range(threshold * (policy.overdue + 1))]  # overdue: no wait
        assert gc.get_stats()[0]["collections"] > automatic  # CPython's, at once
        assert sum(policy.collections) == done
        del kept
        await service.register("q", [spec(work, every="1h")])  # registering: CPython's
        assert gc.isenabled() and policy._young is None
        assert gc.get_threshold()[0] == threshold
    assert gc.isenabled()


async def test_runs_waiting_for_a_slot_start_before_the_outcomes_of_their_instant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(TimerQueue, "slice", 60.0)
    # the order, not the bound: an outcome waits at most OUTCOME_YIELDS loop steps, which
    # a slow fsync of the waiting wave's start can outlast
    monkeypatch.setattr(runner_module, "OUTCOME_YIELDS", 1_000_000)
    kernel, service = make_kernel(tmp_path, max_concurrency=2)
    order: list[str] = []

    async def work() -> None:
        order.append("start")

    at = datetime.fromtimestamp(time.time() + 1.5, UTC).isoformat()
    async with kernel:
        runner = service._runner
        assert runner.outcomes is not None
        record = runner.outcomes.record

        def recorded(stream: str, events: list[Any]) -> Any:
            order.append("outcome")
            return record(stream, events)

        monkeypatch.setattr(runner.outcomes, "record", recorded)
        await service.register("p", [spec(work, name=f"t{i}", at=at) for i in range(6)])
        await wait_events(kernel, "TaskSucceeded", 6)
    # three waves of two slots: the second wave, waiting for a slot, starts before the
    # first wave's outcomes are built (without the slot given back first and the wait,
    # the first outcome comes right after the first two starts). The third wave's start
    # may follow an outcome: its claim is being committed when the second wave's runs end
    # (the outcomes are appended after it, see Outcomes).
    assert sorted(order) == ["outcome"] * 6 + ["start"] * 6
    assert order.index("outcome") >= 4, order


async def test_a_failing_gc_tick_gives_collection_back_to_cpython(tmp_path: Path) -> None:
    import gc

    async def work() -> None: ...

    def broken() -> float:
        raise RuntimeError("next_due exploded")

    kernel, service = make_kernel(tmp_path)
    async with kernel:
        policy = service._gc
        policy.settle, policy.tick = 0.05, 0.01
        policy.idle_tick = 0  # (its 10 ms pace, CPython's threshold the overdue one)
        await service.register("p", [spec(work, every="1h")])
        with anyio.fail_after(10):
            while policy.freezes < 1:
                await anyio.sleep(0.01)
        young = policy._young
        assert young is not None and gc.get_threshold()[0] == policy.overdue * young
        policy._next_due = policy._quiet_for = broken
        kept = [[] for _ in range(young * 2)]  # a collection is due
        with anyio.fail_after(10):
            while gc.get_threshold()[0] != young:  # CPython's threshold again
                await anyio.sleep(0.01)
        assert policy._young is None and gc.isenabled()
        del kept


async def test_the_gc_gap_is_measured_to_when_the_way_to_the_starts_must_begin(
    tmp_path: Path,
) -> None:
    # The lead is twice the learnt way plus a margin: a collection that ends before the
    # instant less the way leaves the burst on time, even if it delays the timer. With
    # bursts closer than lead + gap (every 100 ms, a 50 ms lead), gaps measured to the
    # timer's firing time would never come, and CPython would collect in the bursts.
    kernel, service = make_kernel(tmp_path, max_lead_ms=4000)
    async with kernel:
        runner, policy = service._runner, service._gc
        assert runner.lead == pytest.approx(4.0) and runner.way < 2.0
        instant = time.time() + 4.03  # fires in 30 ms (< the 50 ms gap)...
        service._dispatch._timer.arm("probe", instant, lambda: None, early=True)
        # ...but its way need not begin before instant - way (~2 s from now)
        deadline = service._dispatch.next_deadline()
        assert deadline == pytest.approx(instant - runner.way)
        assert policy._gap()
        service._dispatch._timer.cancel("probe")


async def test_a_run_fired_a_lead_ahead_waits_for_the_run_before_it_until_its_instant(
    tmp_path: Path,
) -> None:
    # A 2 s lead, every 4 s, runs of 3 s: the second run's timer fires (2 s after the
    # first run's instant) while the first still runs, which ends 1 s before the second
    # run's instant. It runs: max_instances skips a run only if the run before it is
    # still in progress at its instant, whatever the lead.
    kernel, service = make_kernel(tmp_path, max_lead_ms=2000)
    starts: list[float] = []

    async def slow() -> None:
        starts.append(time.time())
        await asyncio.sleep(3)

    async with kernel:
        runner = service._runner
        runner._append_peak = 10.0  # the lead stays at its 2 s maximum
        ways: list[float] = []
        note = runner._note_append

        def noted(seconds: float) -> None:
            ways.append(seconds)
            note(seconds)

        runner._note_append = noted  # type: ignore[method-assign]
        await service.register("p", [spec(slow, name="slow", every="4s", max_instances=1)])
        await wait_events(kernel, "TaskSucceeded", 2, timeout=60)
        assert await kernel.read(types=["TaskSkipped"]) == []
        assert len(starts) >= 2 and starts[1] - starts[0] > 3.5
        # the second run waited ~1 s for the first: a wait the lead cannot help,
        # not counted in the way the lead learns from
        assert len(ways) >= 2 and ways[1] < 0.5


async def test_the_runs_of_a_burst_draw_their_ids_without_a_system_call_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run id is a pooled time-ordered id (``kernel.events.new_id``), not a UUID4 read
    from the OS each: that system call released the GIL once per run in the middle of a
    burst's timer callbacks, and each release let another thread (the log's writer)
    hold the loop's thread back for up to a switch interval (5 ms)."""
    import os

    kernel, service = make_kernel(tmp_path)
    calls = 0
    real = os.urandom

    def counted(n: int) -> bytes:
        nonlocal calls
        calls += 1
        return real(n)

    async def work() -> None: ...

    at = datetime.fromtimestamp(time.time() + 1.5, UTC).isoformat()
    async with kernel:
        await service.register("p", [spec(work, name=f"t{i}", at=at) for i in range(100)])
        monkeypatch.setattr(os, "urandom", counted)
        await wait_events(kernel, "TaskSucceeded", 100)
        monkeypatch.undo()
        started = await kernel.read(types=["TaskStarted"])
    assert len({r.data["run_id"] for r in started}) == 100
    assert calls < 20, calls  # the pool refills now and then, not once per run


async def test_a_cron_closer_than_the_lead_fires_at_most_half_its_gap_ahead(
    tmp_path: Path,
) -> None:
    # a cron every second with a lead of 4 s: each instant's timer fired 4 s ahead, so
    # the next instant's fired at once too, and the next... every instant of the lead
    # claimed (and waiting) at once; with a huge max_lead_ms (accepted) thousands of
    # waiting runs a second, without end. Like a short interval, an instant closer to
    # the one before than twice the lead fires at most half that gap ahead.
    kernel, service = make_kernel(tmp_path, max_lead_ms=4000)

    async def work() -> None:
        pass

    async with kernel:
        await service.register("p", [spec(work, name="c", cron="* * * * * *")])
        await wait_events(kernel, "TaskStarted", where=lambda r: r.data["task"] == "p.c")
        when, due = armed_for(service, "p.c")
        # armed for the next instant, at most half its gap (1 s) ahead of it
        assert when >= due - 0.5 - 1e-6


async def test_a_short_interval_with_an_end_fires_at_most_half_a_period_ahead(
    tmp_path: Path,
) -> None:
    # an interval with end= (or start=) is a bounded trigger around the interval: it
    # took the lead (80 ms) ahead of its 20 ms period, four periods, as if it were long
    kernel, service = make_kernel(tmp_path)

    async def work() -> None:
        pass

    async with kernel:
        await service.register(
            "p", [spec(work, name="fast", every="20ms", end="2099-01-01T00:00:00")]
        )
        when, due = armed_for(service, "p.fast")
        assert when >= due - 0.010 - 1e-6


@pytest.mark.parametrize("setting", ["max_lead_ms", "lead_margin_ms"])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1.0])
def test_the_leads_settings_refuse_what_is_not_a_finite_duration(
    setting: str, value: float
) -> None:
    # ``.inf`` in xcore.yaml was accepted: a lead of inf fired every instant's timer at
    # once (-inf) and the GC policy's slack was inf less inf
    from pydantic import ValidationError

    from services.scheduler.config import SchedulerSettings

    with pytest.raises(ValidationError):
        SchedulerSettings(**{setting: value})
    assert SchedulerSettings(**{setting: 0}).model_dump()[setting] == 0


async def test_a_retry_of_a_short_interval_fires_no_further_ahead_than_its_runs(
    tmp_path: Path,
) -> None:
    # an interval shorter than twice max_lead_ms fires its runs half a period ahead;
    # its retry (due just after an instant: retry_delay = the period) fired the full
    # lead ahead, was claimed before that instant's run, and the run, finding it "in
    # progress" (its code not started), was skipped for max_instances: the lead decided
    # (seen with 100 ms: runs 50 ms ahead, the retry 80). Scaled up (a 4 s lead, a 4 s
    # period); judged from the log (when the retry's claim was recorded), not from the
    # timer's state, which a loaded machine may find already fired.
    kernel, service = make_kernel(tmp_path, max_lead_ms=4000)
    calls = 0

    async def work() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("the first attempt fails")

    async with kernel:
        await service.register("p", [spec(work, name="r", every="4s", retries=1, retry_delay=4)])
        (retry,) = await wait_events(kernel, "TaskRetryScheduled")
        (claim,) = await wait_events(
            kernel,
            "TaskStarted",
            where=lambda r: r.data["run_id"] == retry.data["run_id"] and r.data["attempt"] == 2,
        )
        # claimed half the period (2 s) ahead of its retry_at, like the task's runs, never
        # earlier (it was claimed at once: the 4 s lead ahead, at the failure itself)
        assert claim.timestamp >= retry.data["retry_at"] - 2.0 - 0.01
