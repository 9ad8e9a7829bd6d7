"""Executing one run of a task: checks, slot, ``TaskStarted``, the call, the outcome.

A run first checks ``max_instances`` and (for timed runs) its dependencies — a refusal
is ``TaskSkipped`` —, waits for a slot of the global limit (priority first, then due
time), and records ``TaskStarted``: durable before the code starts, written a little
ahead of the due time (:attr:`Runner.lead`, following the slowest recent appends) so
the write does not delay the start. It then waits for the due time in the
:class:`~.timers.StartGate` (sub-millisecond, one wake-up for all the runs of an
instant) and calls the function with its :class:`~kernel.sdk.TaskContext` set (sync
functions in a worker thread, never on the loop) under the task's timeout. Its outcome
is recorded one loop step later, so the other runs of the same instant start first:
``TaskSucceeded`` or ``TaskFailed`` (+ ``TaskRetryScheduled`` when attempts remain). A
run cancelled while its code runs (plugin unloaded, kernel stopping) is
``TaskFailed(kind="cancelled")``; one cancelled after its code returned keeps the
code's outcome.

What happens around a run (when it falls due, what follows it) is the service's
business; the runner tells it through the callbacks it was built with.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import inspect
import json
import logging
import time
import traceback
from collections import deque
from collections.abc import Callable, Container, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pydantic_core

from kernel.errors import KernelStateError, StoreClosed
from kernel.events import Event, Recorded
from kernel.sdk import PluginContext, TaskContext, plugin_context_var, task_context_var
from services.scheduler.claim import ClaimLost, Claims, SlotTaken, claim_key, releasable, release
from services.scheduler.config import SchedulerSettings
from services.scheduler.events import (
    TaskFailed,
    TaskRetryScheduled,
    TaskSkipped,
    TaskStarted,
    TaskSucceeded,
    stream_of,
)
from services.scheduler.limits import PrioritySlots
from services.scheduler.outcomes import Outcomes
from services.scheduler.specs import CompiledTask
from services.scheduler.timers import StartGate

if TYPE_CHECKING:
    from kernel.kernel import Kernel

__all__ = ["Runner", "TaskEntry", "TaskLogger"]

log = logging.getLogger("xcore.scheduler")

#: Why a task may not run now (None: it may).
BlockCheck = Callable[[CompiledTask], "str | None"]
#: Called once a run is over for good (succeeded, or failed with no retry left).
Finished = Callable[[str], None]
#: Called to arm a retry: (entry, run id, next attempt, retry time, scheduled_for).
RetryArm = Callable[["TaskEntry", str, int, float, float], None]


@dataclass(eq=False)
class TaskEntry:
    """A scheduled task as the service and the runner see it."""

    task: CompiledTask
    next_due: float | None
    paused: bool = False
    #: run id -> the asyncio task running it
    active: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    #: "succeeded" | "failed" of the latest finished run (None: never ran)
    last_outcome: str | None = None
    #: run ids whose outcome is recorded but whose sync code still runs in its thread:
    #: they count against ``max_instances`` until the thread returns
    lingering: set[str] = field(default_factory=set)

    #: run id -> (when its code starts: claimed a lead ahead, maybe still to come; its
    #: kind), of the runs in ``active``
    due: dict[str, tuple[float, str]] = field(default_factory=dict)
    #: run ids whose next attempt is pending (a failed attempt will be retried)
    retrying: set[str] = field(default_factory=set)
    #: runs waiting for an instance (retries, catch-up and requested runs), in order
    turns: deque[asyncio.Future[None]] = field(default_factory=deque)
    #: during a ``coalesce="all"`` catch-up, its earliest due time not started yet
    catch_up: float | None = None
    #: set when the task is unscheduled (removed, no longer declared, its plugin
    #: unloaded): a run claimed ahead of its instant then runs nothing
    removed: bool = False
    #: the period of a task whose timed runs fire at most half of it ahead (an interval,
    #: or cron instants, closer than twice ``max_lead_ms``); None: they fire the lead ahead
    short_gap: float | None = None

    @property
    def recorded_next(self) -> float | None:
        """The ``next_run`` events record: the next due time, or an earlier catch-up
        due time not started yet (so a restart after a crash resumes the catch-up)."""
        if self.catch_up is None:
            return self.next_due
        return self.catch_up if self.next_due is None else min(self.catch_up, self.next_due)

    @property
    def instances(self) -> int:
        """Runs of this task whose code has not returned yet."""
        return len(self.active) + len(self.lingering)

    def state_at(self, now: float) -> str | None:
        """:attr:`state` as a dependency sees it at ``now``: a run claimed ahead of an
        instant still to come is not running yet (its task is as its last run left it)."""
        if self.lingering:
            return "running"
        retry_ahead = False
        for run_id in self.active:
            at, kind = self.due.get(run_id, (0.0, ""))
            if at <= now:
                return "running"
            retry_ahead = retry_ahead or kind == "retry"  # its last attempt failed
        if self.retrying or retry_ahead:
            return "retrying"
        return self.last_outcome

    @property
    def state(self) -> str | None:
        """``running``, ``retrying``, ``succeeded``, ``failed`` or None (never ran)."""
        if self.instances:
            return "running"
        if self.retrying:
            return "retrying"
        return self.last_outcome


class TaskLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Adds ``run_id`` and ``task`` to every record (the text formatter prints extras)."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs


class Runner:
    """Runs tasks under the global limit and records each step; see the module docstring."""

    def __init__(self, *, blocked: BlockCheck, finished: Finished, retry: RetryArm) -> None:
        self.kernel: Kernel | None = None
        self.claims: Claims | None = None
        self.outcomes: Outcomes | None = None
        self.slots = PrioritySlots(1)
        self._blocked = blocked
        self._finished = finished
        self._retry = retry
        self._max_lead = 0.025
        self._lead_margin = 0.003
        self._max_result = 65536
        self._keep_result = 7 * 86400.0
        self._executor: ThreadPoolExecutor | None = None
        #: The precise last wait of each run, to its due time.
        self.gate = StartGate()
        #: run id -> (task id, plugin, generation, the asyncio task running it)
        self._runs: dict[str, tuple[str, str, int, asyncio.Task[None]]] = {}
        self._cancel_reasons: dict[str, str] = {}
        #: runs claimed whose code has not started yet (waiting for their instant or a
        #: slot): run id -> (task id, scheduled_for, when its code starts, kind)
        self._ahead: dict[str, tuple[str, float, float, str]] = {}
        #: set by :meth:`stop`: the runs it releases (claimed ahead of an instant still
        #: to come) and, per task, the ``next_run`` their ``TaskReleased`` record
        self._releasing: set[str] = set()
        self._rewind: dict[str, float] = {}
        #: run ids whose code runs in a worker thread (or a sandbox) right now
        self._sync: set[str] = set()
        self._background: set[asyncio.Task[Any]] = set()
        #: Set first thing in :meth:`stop`: nothing new starts after it.
        self.closed = False
        #: How far ahead of the due time ``TaskStarted`` is written (adapts to the store).
        self.lead = 0.009
        self._append_peak = 0.003
        #: Called when the lead grew (the timer re-computes when it wakes).
        self.lead_grew: Callable[[], None] | None = None
        #: How long runs keep their slot (seconds, a moving average; a cautious start:
        #: until runs have been seen, a run back in a full line does not write ahead).
        self.hold = 1.0
        #: When a run last gave its slot back (``time.perf_counter()``).
        self.released_at = 0.0
        #: The claim keys released at a restart (``TaskReleased``; the task table's).
        self.released_claims: Callable[[], Container[str]] = tuple

    def start(self, kernel: Kernel, settings: SchedulerSettings, stack: AsyncExitStack) -> None:
        self.kernel = kernel
        self.claims = Claims(kernel)
        self.outcomes = Outcomes(kernel, self.claims, self.gate)
        self.slots = PrioritySlots(settings.max_concurrency)
        self._max_result = settings.max_result_bytes
        self._keep_result = settings.keep_results_s
        self._max_lead = settings.max_lead_ms / 1000
        self._lead_margin = settings.lead_margin_ms / 1000
        # a cautious start: the full lead until starts have been seen (the first burst
        # of many runs due at one instant, right after boot, is the slowest)
        self._append_peak = max(self._append_peak, (self._max_lead - self._lead_margin) / 2)
        self.lead = self._lead_for(self._append_peak)
        self._executor = ThreadPoolExecutor(
            max_workers=settings.threads or settings.max_concurrency,
            thread_name_prefix="xcore-task",
        )
        stack.callback(self._executor.shutdown, wait=False, cancel_futures=True)
        stack.callback(self.gate.close)

    async def stop(self) -> None:
        """Cancel the runs in progress (recorded as failed) and the background steps."""
        self.closed = True
        # A timed run or a retry claimed ahead of an instant still to come has not run
        # its code: it is released (as a restart after a SIGKILL would), not failed, so
        # a process back before the instant runs it (docs/scheduler.md, *Shutdown*).
        now = time.time()
        for run_id, (tid, scheduled_for, start_at, kind) in self._ahead.items():
            if releasable(kind, start_at if kind == "retry" else scheduled_for, now):
                self._releasing.add(run_id)
                if kind == "schedule":
                    self._rewind[tid] = min(self._rewind.get(tid, scheduled_for), scheduled_for)
        running = []
        for run_id, (_, _, _, task) in list(self._runs.items()):
            self._cancel_reasons[run_id] = STOPPED
            task.cancel()
            running.append(task)
        if running:
            await asyncio.wait(running, timeout=5)
        for batches in (self.claims, self.outcomes):
            if batches is not None:  # what the runs queued is written, not dropped
                await batches.drain(timeout=5)
        for bg in list(self._background):
            bg.cancel()
        if self._background:
            await asyncio.wait(list(self._background), timeout=5)

    def cancel_runs(self, plugin: str, generation: int | None, reason: str) -> None:
        """Cancel ``plugin``'s runs in progress (of one generation, or all of them)."""
        for run_id, (_, p, gen, task) in list(self._runs.items()):
            if p == plugin and (generation is None or gen == generation):
                self._cancel_reasons[run_id] = reason
                task.cancel()

    def queue_position(self, entry: TaskEntry) -> int:
        """Where a run of ``entry`` asked for now would stand: 0, it starts at once;
        n >= 1, it is n-th in line (behind its task's instance limit or the global one)."""
        blocked = entry.instances >= entry.task.max_instances or (
            self.slots.busy >= self.slots.limit
        )
        if not blocked:
            return 0
        return 1 + len([f for f in entry.turns if not f.done()]) + self.slots.waiting

    async def _wait_unclaimed(
        self,
        waiting: Coroutine[Any, Any, Any],
        task: CompiledTask,
        entry: TaskEntry,
        run_id: str,
        scheduled_for: float,
        kind: str,
        pre: list[Event] | None,
        cause: Recorded | None,
    ) -> float:
        """Await ``waiting`` (a run's turn, or its instant) before the run claims anything:
        meanwhile the run is listed as running (so it can be cancelled), and a cancelled
        wait records that it never started. Returns the seconds waited."""
        me = asyncio.current_task()
        assert me is not None
        self._runs[run_id] = (task.id, task.plugin, task.generation, me)
        began = time.perf_counter()
        try:
            await waiting
        except asyncio.CancelledError:
            await self._never_started(entry, run_id, scheduled_for, kind, pre, cause)
            raise
        finally:
            self._runs.pop(run_id, None)
        return time.perf_counter() - began

    async def _instance_turn_within(self, entry: TaskEntry, seconds: float) -> None:
        """Wait for a turn under ``max_instances``, at most ``seconds``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._instance_turn(entry)

    async def _instance_turn(self, entry: TaskEntry) -> None:
        loop = asyncio.get_running_loop()
        while entry.instances >= entry.task.max_instances:
            fut: asyncio.Future[None] = loop.create_future()
            entry.turns.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    _next_turn(entry)  # woken and cancelled in one step: pass it on
                raise

    def cancel_run(self, task_id: str, run_id: str, reason: str) -> str:
        """Cancel run ``run_id`` of task ``task_id``: ``cancelled``, ``not_cancellable``
        (sync code in a thread cannot be stopped in-process) or ``not_running`` (no such
        run in progress *of that task*: a request names the task it is recorded for)."""
        found = self._runs.get(run_id)
        if found is None or found[0] != task_id:
            return "not_running"
        tid = found[0]
        if run_id in self._sync:
            log.warning("task %s run %s: cancel refused, sync code in a thread", tid, run_id)
            return "not_cancellable"
        self._cancel_reasons[run_id] = reason
        found[3].cancel()
        return "cancelled"

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` in the background; its failure is logged, never lost.

        Once the runner is stopping, ``coro`` is closed unrun (nothing starts any more).
        """
        if self.closed:
            coro.close()
            log.debug("scheduler stopping: a background step was not started")
            return
        bg = asyncio.create_task(coro)
        self._background.add(bg)
        bg.add_done_callback(self._reap)

    def _reap(self, bg: asyncio.Task[Any]) -> None:
        self._background.discard(bg)
        if bg.cancelled() or (exc := bg.exception()) is None:
            return
        if self.closed and isinstance(exc, (KernelStateError, StoreClosed)):
            # a step that outlived the stop (a run's code still returning): what it
            # would have recorded is settled at the next start (runs left in progress
            # are recorded as interrupted), so this is no failure of the scheduler's
            log.warning("scheduler stopped before a step could record its events: %s", exc)
            return
        log.error("scheduler background step failed", exc_info=exc)

    async def append(self, tid: str, events: list[Event], cause: Recorded | None = None) -> None:
        """Append ``events`` to the stream of task ``tid`` (nothing if empty)."""
        if events:
            kernel = self.kernel
            if kernel is None:
                raise RuntimeError("the scheduler service is not started")
            await kernel.append(events, stream=stream_of(tid), actor="scheduler", cause=cause)

    @property
    def way(self) -> float:
        """The learnt way from a timer to a durable start (seconds; the lead is twice
        it plus ``lead_margin_ms``, at most ``max_lead``)."""
        return min(self._append_peak, self.lead)

    @property
    def lead_margin(self) -> float:
        """What the lead keeps for the machine's own pauses (seconds; ``lead_margin_ms``)."""
        return self._lead_margin

    @property
    def max_lead(self) -> float:
        """The most the lead may be (seconds; the ``max_lead_ms`` setting)."""
        return self._max_lead

    def _lead_for(self, peak: float) -> float:
        """Twice the slowest recent way plus the margin for the machine's own pauses
        (``lead_margin_ms``), at most ``max_lead_ms``."""
        return min(self._max_lead, 2 * peak + self._lead_margin)

    def _note_append(self, seconds: float) -> None:
        # The lead follows the slow starts, not the mean: a start recorded late is a
        # late run, a start recorded a few ms early costs little (fsync times here
        # have a p50 of ~1.6 ms and a p99 of ~5 ms; a burst of 100 runs due at one
        # instant takes 15-50 ms from its timer to its commit, loaded). ``seconds`` is the
        # way from the timer to the durable start when the run had a timer, else the
        # append alone. The peak halves in ~700 appends. The margin is not learnt: a
        # pause of the machine comes without warning (1-2 a second, 15-30 ms, on the
        # benchmarks' VM), and the way it lengthens is the one it falls in.
        self._append_peak = max(seconds, self._append_peak * 0.999)
        before, self.lead = self.lead, self._lead_for(self._append_peak)
        if self.lead > before + 0.001 and self.lead_grew is not None:
            self.lead_grew()  # the timer wakes earlier for the instants armed already

    def _give_back(self, taken_at: float) -> None:
        """Release a slot (when it is really free: a sync run's thread has returned) and
        note how long it was kept, for :meth:`_write_ahead`."""
        self.slots.release()
        now = time.perf_counter()
        self.hold += (now - taken_at - self.hold) * 0.05
        self.released_at = now

    def _write_ahead(self) -> bool:
        """Whether a run about to take a slot writes its start record first, while it
        waits: never when a slot is free (no wait); always in the next wave (fewer than
        ``limit`` runs ahead); further back, when its wave should come within
        :data:`AHEAD_WAIT` at the recent pace (``hold``: how long runs keep a slot) and
        the line is moving (a slot was given back within ``AHEAD_WAIT``: fast runs seen
        earlier say nothing of slow ones holding every slot now)."""
        slots = self.slots
        if slots.free:
            return False
        waiting = slots.waiting
        if waiting < slots.limit:
            return True
        if time.perf_counter() - self.released_at > AHEAD_WAIT:
            return False
        return (waiting // slots.limit + 1) * self.hold <= AHEAD_WAIT

    async def run(
        self,
        entry: TaskEntry,
        run_id: str,
        scheduled_for: float,
        *,
        attempt: int,
        kind: str,
        next_run: float | None,
        start_at: float,
        cause: Recorded | None = None,
        pre: list[Event] | None = None,
        placed: bool = False,
        armed: float | None = None,
        slot: str | None = None,
    ) -> None:
        """One attempt of a run; ``pre`` events are appended with its first event.

        ``slot``: what keys the claim of a run that is not its trigger's (the request
        that asked for it, a dependency-triggered run's id; ``claim.claim_key``).

        ``placed``: the dispatcher already waited this node's placement delay (a
        takeover), so the run claims at once. ``armed``: when its timer was set to fire
        (:attr:`lead` ahead of ``start_at``), so the lead learns how long the whole way
        from the timer to a durable start takes (for a burst of runs due together: the
        timer's callbacks, each run's start record, their commit), not the append alone."""
        task = entry.task
        tid = task.id
        events: list[Event] = list(pre or ())
        reason = None
        me = asyncio.current_task()
        assert me is not None
        waited = False
        #: how long a run fired ahead waited for the run before it (not the way's)
        turn_wait = 0.0
        if entry.instances >= task.max_instances and (
            kind in ("retry", "request") or (kind == "misfire" and not _waiting(entry))
        ):
            waited = True
            # A retry or an operator's run is not dropped at the limit: it waits for its
            # turn (in order of arrival), then runs; so does a catch-up run, if no other
            # run waits already (a task slower than its period queues at most one).
            await self._wait_unclaimed(
                self._instance_turn(entry), task, entry, run_id, scheduled_for, kind, pre, cause
            )
        elif (
            entry.instances >= task.max_instances
            and kind == "schedule"
            and (ahead := start_at - time.time()) > 0
        ):
            # Fired a lead ahead of its instant: the run before it may still end in time.
            # It is skipped only if that run is still in progress at its instant, as if
            # its timer had fired then, whatever the lead (a 60 ms run every 100 ms is
            # not skipped because the lead grew to 50 ms).
            waited = True
            turn_wait = await self._wait_unclaimed(
                self._instance_turn_within(entry, ahead),
                *(task, entry, run_id, scheduled_for, kind, pre, cause),
            )
        if kind == "schedule" and task.depends_on and (ahead := start_at - time.time()) > 0:
            # Fired a lead ahead of its instant: its dependencies are judged at its
            # instant, not at the lead (a dependency may finish, or start, in between;
            # the leads of two schedules differ), so the run waits for its instant
            # before it decides (and claims).
            waited = True
            turn_wait += await self._wait_unclaimed(
                asyncio.sleep(ahead), task, entry, run_id, scheduled_for, kind, pre, cause
            )
        if entry.removed:
            # unscheduled while the run waited for its turn (or before it began): it
            # claims nothing, no start record after the task's TaskUnscheduled
            reason = "unscheduled: the task was unscheduled before the run started"
        elif entry.instances >= entry.task.max_instances:
            # the task as it is now: a reload may have changed its limit meanwhile
            limit = entry.task.max_instances
            reason = f"max_instances ({limit}) reached: a run is still in progress"
        elif waited and entry.paused and kind in ("retry", "misfire", "schedule"):
            # paused while it waited for its turn: a paused task starts no timed run and
            # no retry (a run asked for by hand still runs)
            reason = f"paused: {kind} run dropped (the task was paused while it waited)"
        elif kind not in ("request", "dependency") and task.depends_on:
            # (a dependency-triggered run was checked when its dependency finished)
            reason = self._blocked(task)
        if reason is not None:
            events.append(
                TaskSkipped(
                    task=tid,
                    scheduled_for=scheduled_for,
                    reason=reason,
                    next_run=entry.recorded_next,
                    run_id=run_id,
                )
            )
            await self.append(tid, events, cause)
            if kind == "retry":  # the run ends with its failed attempt
                entry.retrying.discard(run_id)
                entry.last_outcome = "failed"
            return
        entry.retrying.discard(run_id)
        entry.active[run_id] = me
        entry.due[run_id] = (start_at, kind)
        self._runs[run_id] = (tid, task.plugin, task.generation, me)
        acquired = started = finished = interrupted = False
        #: the worker thread's future of a sync run: the slot is its until it ends
        thread: list[concurrent.futures.Future[Any]] = []
        t_start = t_slot = time.perf_counter()
        started_at: float | None = None
        error: tuple[str, str, str] | None = None
        value: Any = None
        duration_ms = 0.0
        lost = False
        skipped: TaskSkipped | None = None
        try:
            kernel = self.kernel
            assert kernel is not None
            # a cluster spreads runs over its nodes: others claim only after a grace
            key = claim_key(
                task,
                scheduled_for,
                attempt,
                cause,
                # a retry is keyed by its run (the same id on every node): keyed by its
                # run's due time, a requested run's retry would share a timed one's key
                run_id if slot is None and kind == "retry" else slot,
                self.released_claims(),
            )
            delay = 0.0 if placed else kernel.placement.delay(tid)
            if delay > 0:
                await asyncio.sleep(delay)
                if kernel.placement.claimed(key):
                    raise ClaimLost(f"run {key} was claimed during the grace")
            # When the global limit is full but the run's slot should come soon (it is
            # in the next wave, or the slots turn over fast enough that its wave comes
            # within AHEAD_WAIT), the start record is written while it waits for its
            # slot: an fsync after the waves ahead would add itself to its lateness.
            # Further back in a slow line, the run waits for its slot first.
            queued = 0.0  # how long the run waited for its slot before its start record
            if not self._write_ahead():
                await self.slots.acquire(task.priority, scheduled_for)
                acquired = True
                queued = time.perf_counter() - t_slot
                t_slot = time.perf_counter()
            events.append(
                TaskStarted(
                    task=tid,
                    run_id=run_id,
                    scheduled_for=scheduled_for,
                    attempt=attempt,
                    trigger=kind,
                    takeover=placed,
                    next_run=next_run
                    if entry.catch_up is None or next_run is None
                    else min(next_run, entry.catch_up),
                )
            )
            t0 = time.perf_counter()
            cancelled = await self._write_start(tid, events, cause, key)
            if armed is not None and delay <= 0:
                # a wait for a slot (or for the run before it) is the line's, not the
                # way's: the lead cannot help
                self._note_append(time.time() - armed - queued - turn_wait)
            else:
                self._note_append(time.perf_counter() - t0)
            started = True
            self._ahead[run_id] = (tid, scheduled_for, start_at, kind)
            if cancelled:  # the log says the run started: it must say how it ended
                raise asyncio.CancelledError
            # built before the wait for a slot: a later wave of a burst (100 runs, 32
            # slots) starts as soon as it has its slot, after the instant
            ctx, plugin_ctx = self._context(task, run_id, scheduled_for, attempt)
            if not acquired:
                await self.slots.acquire(task.priority, scheduled_for)
                acquired = True
                t_slot = time.perf_counter()
            await self.gate.wait_until(start_at)
            # The start record was written a lead ahead: what happened to the task
            # since then decides what runs now (nothing awaits from here to the call).
            stale = _stale(entry, kind)
            if stale is not None:
                self._cancel_reasons[run_id] = stale
                raise asyncio.CancelledError
            if entry.task is not task:  # reloaded (or changed) meanwhile: the new code
                task = entry.task
                ctx, plugin_ctx = self._context(task, run_id, scheduled_for, attempt)
            self._ahead.pop(run_id, None)
            t_start, started_at = time.perf_counter(), time.time()
            error, value = await self._execute(task, ctx, plugin_ctx, thread)
            duration_ms = (time.perf_counter() - t_start) * 1000
            finished = True
            # The runs woken at the same instant start before this outcome is recorded
            # (building and queueing its event costs more than starting a run), and so
            # do the runs of the instant waiting for a slot: the slot is given back
            # first, and the outcome waits while runs wait for a slot (a wave starts
            # per loop step; at most OUTCOME_YIELDS steps: a line of slow runs does not
            # hold it back for long).
            if not _busy(thread):
                acquired = False
                self._release_slot(None, t_slot)
            line = self.slots.line_moved(OUTCOME_YIELDS)
            await (asyncio.sleep(0) if line is None else line)
        except SlotTaken as taken:  # this node ran this slot already: say so
            log.warning("task %s: run %s not started: %s", tid, run_id, taken)
            lost = True
            skipped = TaskSkipped(
                task=tid,
                scheduled_for=scheduled_for,
                reason=f"not started: {taken}",
                next_run=entry.recorded_next,
                run_id=run_id,
            )
        except ClaimLost as lost_to:  # another node runs it: nothing to record here
            log.debug("task %s: %s", tid, lost_to)
            lost = True
        except asyncio.CancelledError:
            if finished:  # the code had returned: its outcome is recorded, then we stop
                self._cancel_reasons.pop(run_id, None)
                interrupted = True
            else:
                if started and started_at is None and run_id in self._releasing:
                    self._cancel_reasons.pop(run_id, None)
                    await self._release(entry, run_id, scheduled_for, attempt, kind, start_at, key)
                elif started:
                    why = self._cancel_reasons.pop(run_id, "cancelled")
                    if _busy(thread):
                        why += " (its code is still running in its thread)"
                    await self.append(
                        tid,
                        [
                            TaskFailed(
                                task=tid,
                                run_id=run_id,
                                attempt=attempt,
                                error=why,
                                duration_ms=(time.perf_counter() - t_start) * 1000,
                                kind="cancelled",
                                **_timing(scheduled_for, started_at),
                            )
                        ],
                    )
                    entry.last_outcome = "failed"
                elif not acquired:  # cancelled waiting for a slot: say so
                    await self._never_started(entry, run_id, scheduled_for, kind, pre, cause)
                raise
        finally:
            if acquired:
                self._release_slot(thread[0] if thread else None, t_slot)
            if _busy(thread):
                self._linger(entry, run_id, thread[0])
            entry.active.pop(run_id, None)
            entry.due.pop(run_id, None)
            self._runs.pop(run_id, None)
            self._ahead.pop(run_id, None)
            _next_turn(entry)
        if lost:
            if skipped is not None:
                await self.append(tid, [skipped], cause)
            return
        await self._record_outcome(
            entry, run_id, scheduled_for, attempt, error, duration_ms, started_at, value
        )
        if interrupted:
            raise asyncio.CancelledError

    async def _release(
        self,
        entry: TaskEntry,
        run_id: str,
        scheduled_for: float,
        attempt: int,
        kind: str,
        start_at: float,
        key: str,
    ) -> None:
        """Record ``TaskReleased`` for a run claimed ahead of its instant whose code did
        not start because the kernel stopped: its instant runs again after the restart
        (``next_run`` goes back to it; a retry is pending again at its time), under a
        claim key derived from this one, as after a SIGKILL (``service.py``)."""
        tid = entry.task.id
        rewind = self._rewind.get(tid)
        recorded = entry.recorded_next
        if rewind is not None:
            recorded = rewind if recorded is None else min(recorded, rewind)
        due = start_at if kind == "retry" else scheduled_for
        await self.append(
            tid,
            [
                release(
                    task=tid,
                    run_id=run_id,
                    scheduled_for=scheduled_for,
                    attempt=attempt,
                    trigger=kind,
                    claim=key,
                    due=due,
                    next_run=recorded,
                    why=(
                        "the kernel stopped after claiming this run "
                        f"{due - time.time():.3f} s ahead of its instant"
                    ),
                )
            ],
        )
        log.info("task %s: run %s released at stop (its instant had not come)", tid, run_id)

    async def _write_start(
        self, tid: str, events: list[Event], cause: Recorded | None, key: str
    ) -> bool:
        """Claim the run with its first events; True if the run was cancelled meanwhile.

        The store commits a write even if its caller stops waiting, so a cancelled run
        still waits for its ``TaskStarted`` to be durable (and then records its end).
        Raises ClaimLost when another node started this run (``claim.py``).
        """
        assert self.kernel is not None
        assert self.claims is not None
        # the claims of one loop step (the runs due at one instant) go in one batch
        writing = self.claims.claim(stream_of(tid), events, key, cause)
        cancelled = False
        while not writing.done():
            try:
                # (a wait, not ``shield``: one callback less per run; neither cancels
                # the claim when the run is)
                await asyncio.wait((writing,))
            except asyncio.CancelledError:
                cancelled = True
        writing.result()  # the store's error, if any, is the run's
        return cancelled

    def _release_slot(self, thread: concurrent.futures.Future[Any] | None, taken_at: float) -> None:
        """Free the run's slot now, or when its worker thread ends if it still runs.

        A thread cannot be cancelled: a sync run that timed out or was cancelled keeps
        its slot (and its worker) until its code returns, so the limit holds.
        """
        if thread is None or thread.done():
            self._give_back(taken_at)
            return
        loop = asyncio.get_running_loop()

        def ended(_: concurrent.futures.Future[Any]) -> None:
            try:
                loop.call_soon_threadsafe(self._give_back, taken_at)
            except RuntimeError:  # the loop closed meanwhile: no slot to give back
                log.debug("a sync task's thread ended after the event loop closed")

        thread.add_done_callback(ended)

    async def _never_started(
        self,
        entry: TaskEntry,
        run_id: str,
        scheduled_for: float,
        kind: str,
        pre: list[Event] | None,
        cause: Recorded | None,
    ) -> None:
        """A run cancelled before its start record: what it saw (``pre``) is kept, and
        a run someone asked for (or a retry) ends with ``TaskSkipped`` instead of
        staying "queued" for ever in the runs list."""
        events: list[Event] = list(pre or ())
        if kind in ("request", "retry"):
            why = self._cancel_reasons.pop(run_id, "cancelled")
            events.append(
                TaskSkipped(
                    task=entry.task.id,
                    scheduled_for=scheduled_for,
                    reason=f"{why} before it started",
                    next_run=entry.recorded_next,
                    run_id=run_id,
                )
            )
            if kind == "retry":
                entry.retrying.discard(run_id)
                entry.last_outcome = "failed"
        await self.append(entry.task.id, events, cause)

    def _linger(
        self, entry: TaskEntry, run_id: str, thread: concurrent.futures.Future[Any]
    ) -> None:
        """Count the run against ``max_instances`` until its worker thread returns."""
        entry.lingering.add(run_id)
        loop = asyncio.get_running_loop()

        def freed() -> None:
            entry.lingering.discard(run_id)
            _next_turn(entry)

        def ended(_: concurrent.futures.Future[Any]) -> None:
            try:
                loop.call_soon_threadsafe(freed)
            except RuntimeError:  # the loop closed meanwhile
                log.debug("a sync task's thread ended after the event loop closed")

        thread.add_done_callback(ended)

    async def _record_outcome(
        self,
        entry: TaskEntry,
        run_id: str,
        scheduled_for: float,
        attempt: int,
        error: tuple[str, str, str] | None,
        duration_ms: float,
        started_at: float | None,
        value: Any,
    ) -> None:
        """``TaskSucceeded`` or ``TaskFailed`` (+ ``TaskRetryScheduled``), then what follows."""
        task = entry.task
        tid = task.id
        timing = _timing(scheduled_for, started_at)
        if error is None:
            entry.last_outcome = "succeeded"
            result, result_error = self._keepable(task, value)
            keep = task.keep_result if task.keep_result is not None else self._keep_result
            await self._append_outcome(
                tid,
                [
                    TaskSucceeded(
                        task=tid,
                        run_id=run_id,
                        attempt=attempt,
                        duration_ms=duration_ms,
                        result=result,
                        result_error=result_error,
                        keep_result_s=keep if result is not None else None,
                        **timing,
                    )
                ],
            )
            self._finished(tid)
            return
        kind_failed, message, tb = error
        retry = attempt <= task.retries
        done: list[Event] = [
            TaskFailed(
                task=tid,
                run_id=run_id,
                attempt=attempt,
                error=message,
                traceback=tb,
                duration_ms=duration_ms,
                kind=kind_failed,
                will_retry=retry,
                **timing,
            )
        ]
        if retry:
            delay = task.retry_backoff(attempt)
            retry_at = time.time() + delay
            done.append(
                TaskRetryScheduled(
                    task=tid,
                    run_id=run_id,
                    attempt=attempt + 1,
                    delay_s=delay,
                    retry_at=retry_at,
                    scheduled_for=scheduled_for,
                )
            )
            entry.retrying.add(run_id)
        else:
            entry.last_outcome = "failed"
        await self._append_outcome(tid, done)
        if retry:
            self._retry(entry, run_id, attempt + 1, retry_at, scheduled_for)
        else:
            self._finished(tid)

    async def _append_outcome(self, tid: str, events: list[Event]) -> None:
        """Append a run's outcome events with the other outcomes of its loop step
        (``outcomes.py``); durable when this returns, as :meth:`append`."""
        outcomes = self.outcomes
        if outcomes is None:
            raise RuntimeError("the scheduler service is not started")
        await outcomes.record(stream_of(tid), events)

    def _keepable(self, task: CompiledTask, value: Any) -> tuple[Any, str | None]:
        """The return value as recorded: JSON, at most ``max_result_bytes``; else None
        and why (the run still succeeded)."""
        if value is None:
            return None, None
        try:
            text = json.dumps(value, allow_nan=False)
            # what the log's encoder takes (pydantic's serializer: nesting below ~250
            # levels, with a margin for the event's own): a value it refuses would lose
            # the run's outcome event
            _encodable(json.loads(text))
        except (TypeError, ValueError, RecursionError) as exc:
            log.warning("task %s: its return value is not kept: %s", task.id, exc)
            return None, f"not JSON-serializable: {_describe(exc)}"
        if len(text.encode()) > self._max_result:
            log.warning(
                "task %s: its return value (%d bytes) is over the %d-byte limit; not kept",
                task.id,
                len(text.encode()),
                self._max_result,
            )
            return None, f"too large: {len(text.encode())} bytes > {self._max_result}"
        return json.loads(text), None

    def _context(
        self, task: CompiledTask, run_id: str, scheduled_for: float, attempt: int
    ) -> tuple[TaskContext, PluginContext | None]:
        """What the run's code gets from ``current_task()`` and ``current_plugin()``
        (built before the due time)."""
        rt = task.runtime
        plugin_ctx = rt.context if rt is not None else None
        base_logger = (
            plugin_ctx.logger
            if plugin_ctx is not None
            else logging.getLogger(f"xcore.plugin.{task.plugin}")
        )
        ctx = TaskContext(
            task_id=task.id,
            run_id=run_id,
            scheduled_for=datetime.fromtimestamp(scheduled_for, UTC),
            attempt=attempt,
            plugin=task.plugin,
            config=plugin_ctx.config if plugin_ctx is not None else None,
            logger=TaskLogger(base_logger, {"run_id": run_id, "task": task.id}),
        )
        return ctx, plugin_ctx

    async def _execute(
        self,
        task: CompiledTask,
        ctx: TaskContext,
        plugin_ctx: PluginContext | None,
        thread: list[concurrent.futures.Future[Any]],
    ) -> tuple[tuple[str, str, str] | None, Any]:
        """Call the task's function under its timeout: (None, its return value) on
        success, else ((kind, error, traceback), None). A sync function's worker-thread
        future is put in ``thread``."""
        run_id = ctx.run_id
        task_token = task_context_var.set(ctx)
        plugin_token = plugin_context_var.set(plugin_ctx) if plugin_ctx is not None else None
        try:
            if task.timeout is None:
                return None, await self._call(task, run_id, thread)
            timeout = asyncio.timeout(task.timeout)
            try:
                async with timeout:
                    value = await self._call(task, run_id, thread)
            except TimeoutError:
                if not timeout.expired():
                    raise  # the code's own TimeoutError: an error like any other
                log.warning("task %s run %s timed out after %gs", task.id, run_id, task.timeout)
                still = " (its code is still running in its thread)" if _busy(thread) else ""
                return ("timeout", f"timed out after {task.timeout:g}s{still}", ""), None
            return None, value
        except (Exception, SystemExit) as exc:
            # (SystemExit too: ``sys.exit()`` in a task's code fails that run, it does
            # not stop the server; a KeyboardInterrupt is the operator's, it propagates)
            log.warning("task %s run %s failed: %s", task.id, run_id, _describe(exc))
            tb = _clip("".join(traceback.format_exception(exc)), MAX_TRACEBACK)
            return ("error", _describe(exc), tb), None
        finally:
            task_context_var.reset(task_token)
            if plugin_token is not None:
                plugin_context_var.reset(plugin_token)

    async def _call(
        self, task: CompiledTask, run_id: str, thread: list[concurrent.futures.Future[Any]]
    ) -> Any:
        """Call the function with its arguments: async on the loop, sync in a worker
        thread (or the sandbox); returns what it returned."""
        rt = task.runtime
        fn = task.fn
        if task.args or task.kwargs:
            fn = functools.partial(task.fn, *task.args, **task.kwargs)
        if task.is_async:
            return await fn()
        self._sync.add(run_id)
        try:
            if rt is not None and rt.mode == "sandboxed" and rt.run_sync is not None:
                return await rt.run_sync(fn)
            assert self._executor is not None
            call = contextvars.copy_context().run
            cf = self._executor.submit(call, fn)
            thread.append(cf)
            try:
                value = await asyncio.wrap_future(cf)
            except BaseException:
                if not cf.done():
                    log.warning(
                        "task %s run %s: stopped waiting, but its code is still running in "
                        "its thread (it keeps its slot until it returns)",
                        task.id,
                        run_id,
                    )
                raise
        finally:
            self._sync.discard(run_id)
        if inspect.isawaitable(value):
            # an async function behind a sync wrapper (a decorator without ``async``, a
            # class with an async ``__call__``): its coroutine runs on the loop, not
            # dropped unawaited with the run reported as succeeded
            return await value
        return value


def _stale(entry: TaskEntry, kind: str) -> str | None:
    """Why a run claimed ahead of its instant must not start its code at the instant
    (the task was removed or paused since its claim), or None."""
    if entry.removed:
        return "cancelled: the task was unscheduled after the run was claimed, before its due time"
    if entry.paused and kind != "request":  # a run asked for by hand runs while paused
        return "cancelled: the task was paused after the run was claimed, before its due time"
    return None


def _waiting(entry: TaskEntry) -> bool:
    return any(not f.done() for f in entry.turns)


def wake_turns(entry: TaskEntry) -> None:
    """Wake as many waiting runs as ``entry``'s limit now has room for (after a reload
    raised its ``max_instances``); each re-checks the limit, in order of arrival."""
    for _ in range(max(0, entry.task.max_instances - entry.instances)):
        _next_turn(entry)


def _next_turn(entry: TaskEntry) -> None:
    """Wake the first run waiting for an instance of ``entry`` (it re-checks the limit)."""
    while entry.turns:
        fut = entry.turns.popleft()
        if not fut.done():
            fut.set_result(None)
            return


#: Why :meth:`Runner.stop` cancels the runs in progress.
STOPPED = "the kernel stopped while the run was in progress"


def _timing(scheduled_for: float, started_at: float | None) -> dict[str, Any]:
    """The outcome's record of when the code really started, and how late that was."""
    if started_at is None:
        return {}
    return {
        "started_at": started_at,
        "lateness_ms": round(max(0.0, started_at - scheduled_for) * 1000, 3),
    }


def _busy(thread: list[concurrent.futures.Future[Any]]) -> bool:
    return bool(thread) and not thread[0].done()


#: A run waiting for a slot of a full global limit writes its ``TaskStarted`` while it
#: waits when its turn should come within this many seconds (see ``_write_ahead``):
#: 100 runs due at one instant with 32 slots all have their start durable before the
#: instant, while a line of slow runs does not fill the log with starts long before
#: their code runs.
AHEAD_WAIT = 0.1

#: How many loop steps a finished run's outcome waits at most for the runs waiting for
#: a slot (see ``Runner.run``).
OUTCOME_YIELDS = 8


#: An error message is recorded up to this many characters, a traceback up to this many
#: (the rest is cut, and the cut says how much): a task failing every second with a
#: message of megabytes must not fill the log.
MAX_ERROR = 4_000
MAX_TRACEBACK = 32_000


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [{len(text) - limit} more characters cut]"


def _describe(exc: BaseException) -> str:
    try:
        message = str(exc)
    except Exception as err:  # a hostile __str__: say so rather than lose the outcome
        message = f"<str() of the exception failed: {type(err).__name__}>"
    return _clip(f"{type(exc).__name__}: {message}", MAX_ERROR)


def _encodable(value: Any) -> None:
    """Raise ``ValueError`` if the log could not encode ``value`` inside an event."""
    pydantic_core.to_json([[[[value]]]])
