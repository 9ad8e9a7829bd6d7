"""Dispatching runs: when each run falls due, and what it is handed to.

The dispatcher owns the scheduled tasks' entries and the :class:`~.timers.TimerQueue`.
A task's timer fires :attr:`Runner.lead` ahead of its due time (plus its jitter); the
dispatcher then applies the misfire policy — due runs missed while the kernel was down
or the loop was blocked are coalesced to one run (``run_once``) or skipped (``skip``)
past the grace time, recorded as ``TaskMissed`` — computes the next due time, re-arms,
and hands the run to the :class:`~.runner.Runner`. It also starts retries at their time,
runs requested by an operator, and tasks without a trigger of their own once their
dependencies have finished (by the ``success`` or ``finished`` rule).

In a cluster only the first node of a task's ranking (``kernel.placement``) starts its
scheduled runs at their time. Every other node arms a *takeover* instead: a timer at the
due time plus its placement delay that starts the run only if the node has not seen it
claimed by then (the first node died, or is too slow). A run the first node claimed
costs the others one timer entry and one set lookup — no task, no claim, no exception.
Exactly-once does not rest on this: the claim itself decides (``claim.py``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

from kernel.events import Event, new_id
from services.scheduler.claim import claim_key
from services.scheduler.events import TaskMissed, TaskSkipped
from services.scheduler.projection import TaskTable
from services.scheduler.runner import Runner, TaskEntry
from services.scheduler.specs import CompiledTask
from services.scheduler.timers import TimerQueue
from services.scheduler.triggers import Bounded, IntervalTrigger, catch_up

__all__ = ["Dispatcher"]

#: In a cluster, how many missed due times are checked against the others' claims (the
#: rest of a longer outage is counted missed without a look-up).
MISSED_CHECKED = 200

log = logging.getLogger("xcore.scheduler")

#: A slot given back this recently (seconds) with runs waiting for one: the waves of a
#: burst are starting (see ``Dispatcher.quiet_for``).
WAVE = 0.01


class Dispatcher:
    """Arms the timers of scheduled tasks and starts their runs; see the module docstring."""

    def __init__(self, table: TaskTable) -> None:
        #: The task table projection (what the log says of tasks not scheduled here).
        self.table = table
        #: task id -> its entry
        self.tasks: dict[str, TaskEntry] = {}
        self.runner = Runner(
            blocked=self._dependency_block, finished=self._after_finish, retry=self.arm_retry
        )
        self._dependents: dict[str, set[str]] = {}
        # timers fire the runner's lead ahead of due times, the lead as it is then
        # the claims of one instant's runs go in one batch, however many slices the
        # timer takes to fire them
        self._timer = TimerQueue(lead=lambda: self.runner.lead, hold=lambda: self.runner.claims)
        self.runner.lead_grew = self._timer.lead_changed
        self.runner.released_claims = lambda: self.table.released
        self._stopping = False
        #: ``coalesce="all"`` runs at most this many missed due times (the setting).
        self.max_catch_up = 100

    def start(self) -> None:
        self._timer.start()

    async def stop(self) -> None:
        self._stopping = True
        await self._timer.stop()
        await self.runner.stop()

    def next_time(self) -> float | None:
        """When the next timer fires (a hint; see :meth:`TimerQueue.next_time`)."""
        return self._timer.next_time()

    def next_deadline(self) -> float | None:
        """When the way to the next timer's durable starts must begin at the latest to
        be on time: its due instant less the learnt way (:attr:`Runner.way`), not its
        firing time, and less the margin kept for the machine's own pauses
        (``lead_margin_ms``). The lead is twice the way plus that margin, so a pause
        that ends by then (a collection of the GC policy) does not make that burst late
        and leaves the margin whole, while gaps measured to the firing time would never
        come when instants are closer than the lead plus the pause (bursts every 100
        ms, an 80 ms lead)."""
        runner = self.runner
        slack = runner.lead - runner.way - runner.lead_margin
        return self._timer.next_time(slack=max(0.0, slack))

    def quiet_for(self) -> float:
        """Seconds until the next *start window* opens (0.0: one is open now).

        A start window runs from the moment a timer fires its runs (a lead ahead of
        their instant) until the runs of that instant are released at it: their
        claims are being written, or they wait in the :class:`~.timers.StartGate`.
        Work that is not a start (a young collection of the GC policy) runs outside
        it, after the burst has started, so it never delays one.

        Runs released at their instant beyond the global limit start in waves, one per
        slot given back: while runs wait for a slot and one was given back within
        :data:`WAVE` seconds, the window is still open (a line that does not move, slow
        runs holding every slot, keeps it closed: those runs wait anyway)."""
        runner = self.runner
        claims = runner.claims
        if (claims is not None and claims.busy) or runner.gate.pending:
            return 0.0
        if runner.slots.waiting and time.perf_counter() - runner.released_at < WAVE:
            return 0.0
        fires = self._timer.next_time()
        if fires is None:
            return float("inf")
        return max(0.0, fires - time.time())

    def disarm(self, tid: str) -> None:
        self._timer.cancel(tid)

    def run_now(self, entry: TaskEntry, run_id: str, request: str) -> int:
        """Start run ``run_id`` of ``entry`` now (an operator's request, event id
        ``request``: every node that sees it claims the same key, one runs it); returns
        its position in the queue (0: it starts at once; n: n runs wait ahead of it)."""
        position = self.runner.queue_position(entry)
        if not self._stopping:
            self._start_now(entry, "request", entry.next_due, run_id=run_id, slot=request)
        return position

    def _start_now(
        self,
        entry: TaskEntry,
        kind: str,
        next_run: float | None,
        run_id: str | None = None,
        slot: str | None = None,
    ) -> None:
        """A first attempt of ``entry``, due and started now (not from its trigger): its
        claim is keyed by ``slot`` (default: its run id), not by its start time."""
        now = time.time()
        run_id = run_id or new_id()
        self.runner.spawn(
            self.runner.run(
                entry,
                run_id,
                now,
                attempt=1,
                kind=kind,
                next_run=next_run,
                start_at=now,
                slot=slot or run_id,
            )
        )

    def index_dependents(self) -> None:
        """Index the dependency-triggered tasks (no trigger of their own) by dependency."""
        index: dict[str, set[str]] = {}
        for tid, entry in self.tasks.items():
            if entry.task.trigger is None:
                for dep in entry.task.depends_on:
                    index.setdefault(dep, set()).add(tid)
        self._dependents = index

    def arm(self, entry: TaskEntry, after: float | None = None) -> None:
        """Arm (or disarm) the timer of ``entry`` for its next due time.

        ``after``: the due time that just came (its run fired), when there is one."""
        task = entry.task
        if entry.paused or entry.next_due is None or self._stopping:
            self._timer.cancel(task.id)
            return
        due = entry.next_due
        offset = random.uniform(0, task.jitter) if task.jitter else 0.0
        # (an interval with ``start=``/``end=`` is a bounded trigger around one)
        trigger = task.trigger.inner if isinstance(task.trigger, Bounded) else task.trigger
        every = trigger.every if isinstance(trigger, IntervalTrigger) else None
        if every is None and after is not None and due > after:
            # a cron (or other) trigger: the gap from the instant that just came, so
            # instants closer than the lead (a 1 s cron, a lead of seconds) do not fire
            # one after the other at once, each claiming the next ahead of its instant
            every = due - after
        short = every is not None and every < 2 * self.runner.max_lead
        entry.short_gap = every if short else None
        if every is not None and short:
            # a short interval: the timer fires at most half a period ahead, so a run is
            # not found still waiting for its instant (max_instances) by the next one
            ahead = min(self.runner.lead, every / 2)
            callback = partial(self._on_due, task.id, due, offset, ahead)
            self._timer.arm(task.id, due + offset - ahead, callback)
        else:
            callback = partial(self._on_due, task.id, due, offset)
            self._timer.arm(task.id, due + offset, callback, early=True)

    def arm_retry(
        self, entry: TaskEntry, run_id: str, attempt: int, retry_at: float, scheduled_for: float
    ) -> None:
        def fire() -> None:
            current = self.tasks.get(entry.task.id)
            if current is None:
                return
            if current.paused:  # a paused task runs nothing: its retry is dropped
                tid = current.task.id
                log.info("task %s is paused: retry %d of run %s dropped", tid, attempt, run_id)
                current.retrying.discard(run_id)
                current.last_outcome = "failed"
                skipped = TaskSkipped(
                    task=tid,
                    scheduled_for=scheduled_for,
                    reason=f"paused: retry (attempt {attempt}) dropped",
                    next_run=current.recorded_next,
                    run_id=run_id,
                )
                self.runner.spawn(self.runner.append(tid, [skipped]))
                return
            self.runner.spawn(
                self.runner.run(
                    current,
                    run_id,
                    scheduled_for,
                    attempt=attempt,
                    kind="retry",
                    next_run=current.next_due,
                    start_at=retry_at,
                )
            )

        key = f"retry:{run_id}"
        if entry.short_gap is not None:
            # fired no further ahead than the task's timed runs: with the full lead, a
            # retry due just after an instant was claimed before that instant's run,
            # which then found it in progress and was skipped (max_instances), though
            # its code had not started: the lead decided
            self._timer.arm(key, retry_at - min(self.runner.lead, entry.short_gap / 2), fire)
        else:
            self._timer.arm(key, retry_at, fire, early=True)

    def _on_due(self, tid: str, due: float, offset: float, ahead: float | None = None) -> None:
        # when the timer meant to fire: the lead ahead (as it is now), or ``ahead``
        armed = due + offset - (self.runner.lead if ahead is None else ahead)
        entry = self.tasks.get(tid)
        if entry is None or entry.paused or entry.next_due != due:
            return
        task = entry.task
        assert task.trigger is not None
        now = time.time()
        count, last, nxt = catch_up(task.trigger, due, max(now, due))
        late = now - (last + offset)
        entry.next_due = nxt
        self.arm(entry, after=last)
        # Which of the due times run: none past the grace with ``skip``; otherwise the
        # ``coalesce`` policy picks the earliest, the latest, or all (bounded).
        if task.misfire == "skip" and late > task.misfire_grace:
            dues: list[float] = []
        elif count == 1:
            dues = [last]
        elif task.coalesce == "earliest":
            dues = [due]
        elif task.coalesce == "all":
            dues = self._first_dues(task, due, min(count, self.max_catch_up))
        else:
            dues = [last]
        missed = count - len(dues)
        pre: list[Event] = []
        kernel = self.runner.kernel
        if missed and kernel is not None and kernel.placement.shared:
            # In a cluster the dues this node missed (it was paused, or restarting) were
            # likely run by another node: only those nobody claimed are recorded missed,
            # once every node would have claimed them.
            self.runner.spawn(self._record_missed(entry, due, count, last, dues, nxt))
        elif missed:
            pre.append(
                TaskMissed(
                    task=tid,
                    count=missed,
                    first=due,
                    last=last,
                    policy=task.misfire,
                    next_run=nxt,
                )
            )
            log.warning("task %s: %d due run(s) missed (%s)", tid, missed, task.misfire)
        if not dues:
            self.runner.spawn(self.runner.append(tid, pre))
            return
        kind = "misfire" if (count > 1 or late > task.misfire_grace) else "schedule"
        if len(dues) == 1:
            first = dues[0]

            def start(placed: bool = False) -> Coroutine[Any, Any, None]:
                return self.runner.run(
                    entry,
                    new_id(),
                    first,
                    attempt=1,
                    kind=kind,
                    next_run=nxt,
                    start_at=first + offset,
                    pre=pre,
                    placed=placed,
                    armed=None if placed else armed,
                )

            if not self._take_over_later(entry, first, start):
                self.runner.spawn(start())
        else:
            self.runner.spawn(self._run_in_turn(entry, dues, nxt, pre))

    def _take_over_later(
        self, entry: TaskEntry, due: float, start: Callable[[bool], Coroutine[Any, Any, None]]
    ) -> bool:
        """Unless this node is first for ``entry`` (or alone): arm the takeover of the
        run due at ``due`` after this node's placement delay, and say so."""
        kernel = self.runner.kernel
        if kernel is None:
            return False
        placement = kernel.placement
        tid = entry.task.id
        delay = placement.delay(tid)
        if delay <= 0:
            return False

        def take_over() -> None:
            if self._stopping or entry.paused or self.tasks.get(tid) is not entry:
                return
            if placement.claimed(claim_key(entry.task, due, 1, None, None, self.table.released)):
                return  # the first node ran it
            self.runner.spawn(start(True))

        self._timer.arm(f"takeover:{tid}:{due!r}", time.time() + delay, take_over)
        return True

    async def _record_missed(
        self,
        entry: TaskEntry,
        first: float,
        count: int,
        last: float,
        ran: list[float],
        nxt: float | None,
    ) -> None:
        """Record as missed the due times from ``first`` to ``last`` (``count`` of them)
        that neither this node (``ran``) nor any other claimed (a cluster)."""
        kernel = self.runner.kernel
        assert kernel is not None
        task = entry.task
        placement = kernel.placement
        await asyncio.sleep(placement.settled(task.id))
        listed = self._first_dues(task, first, min(count, MISSED_CHECKED))
        taken = set(ran)
        unclaimed = [
            d
            for d in listed
            if d not in taken
            and not placement.claimed(claim_key(task, d, 1, None, None, self.table.released))
        ]
        unchecked = count - len(listed)  # past the bound: counted missed, not looked up
        n = len(unclaimed) + unchecked
        if not n:
            log.debug("task %s: the %d due run(s) this node missed ran elsewhere", task.id, count)
            return
        log.warning("task %s: %d due run(s) missed (%s)", task.id, n, task.misfire)
        await self.runner.append(
            task.id,
            [
                TaskMissed(
                    task=task.id,
                    count=n,
                    first=unclaimed[0] if unclaimed else self._after(task, listed[-1], last),
                    last=last if unchecked else unclaimed[-1],
                    policy=task.misfire,
                    next_run=nxt,
                )
            ],
        )

    @staticmethod
    def _after(task: CompiledTask, due: float, default: float) -> float:
        assert task.trigger is not None
        nxt = task.trigger.next_after(due)
        return default if nxt is None else nxt

    def _first_dues(self, task: CompiledTask, due: float, n: int) -> list[float]:
        assert task.trigger is not None
        dues = [due]
        while len(dues) < n:
            nxt = task.trigger.next_after(dues[-1])
            if nxt is None:
                break
            dues.append(nxt)
        return dues

    async def _run_in_turn(
        self, entry: TaskEntry, dues: list[float], nxt: float | None, pre: list[Event]
    ) -> None:
        """``coalesce="all"``: the missed due times run one after the other, in order.

        While it lasts, the events record the earliest due time not started yet as the
        next run (:attr:`TaskEntry.catch_up`), so a process killed in the middle resumes
        the catch-up at its restart instead of skipping past it. A pause stops the
        catch-up (a paused task starts no timed run): the due times not yet started are
        recorded as missed."""
        try:
            for i, due in enumerate(dues):
                if self._stopping or self.tasks.get(entry.task.id) is not entry:
                    return
                if entry.paused:
                    tid, rest = entry.task.id, dues[i:]
                    log.info("task %s is paused: %d catch-up run(s) not started", tid, len(rest))
                    entry.catch_up = None
                    missed = TaskMissed(
                        task=tid,
                        count=len(rest),
                        first=rest[0],
                        last=rest[-1],
                        policy=entry.task.misfire,
                        next_run=entry.next_due,
                    )
                    await self.runner.append(tid, [*(pre if i == 0 else ()), missed])
                    return
                entry.catch_up = dues[i + 1] if i + 1 < len(dues) else None
                await self.runner.run(
                    entry,
                    new_id(),
                    due,
                    attempt=1,
                    kind="misfire",
                    next_run=nxt,
                    start_at=due,
                    pre=pre if i == 0 else None,
                )
        finally:
            entry.catch_up = None

    def dependency_state(self, dep: str) -> str | None:
        """``running``, ``retrying``, ``succeeded``, ``failed`` or None (never ran) — the
        same answer whether ``dep`` is scheduled here (same or other plugin) or only known
        to the log (its plugin is not loaded)."""
        entry = self.tasks.get(dep)
        if entry is not None:
            # a run of ``dep`` claimed ahead of an instant still to come is not running
            return entry.state_at(time.time())
        row = self.table.tasks.get(dep)
        if row is None:
            return None
        if row.running:
            return "running"
        if row.retries:
            return "retrying"
        last = row.last
        if last is None:
            return None
        return "succeeded" if last.outcome == "succeeded" else "failed"

    def _dependency_block(self, task: CompiledTask, finished: str | None = None) -> str | None:
        """Why ``task`` may not run now because of its dependencies (None: it may).

        One rule for every dependency: a dependency running, or failed with a retry
        pending, has not finished; ``success`` needs its latest finished run to have
        succeeded, ``finished`` any outcome. ``finished`` names a dependency whose run
        just ended: its outcome counts even if its next run has already started.
        """
        for dep in task.depends_on:
            state = self.dependency_state(dep)
            if dep == finished and dep in self.tasks:
                state = self.tasks[dep].last_outcome
            if state == "running":
                return f"dependency {dep} is running"
            if state == "retrying":
                return f"dependency {dep} failed and a retry is pending"
            if state is None:
                return f"dependency {dep} has not run yet"
            if task.depends_rule == "success" and state != "succeeded":
                return f"dependency {dep}: its latest run {state}"
        return None

    def _after_finish(self, tid: str) -> None:
        """Start the tasks that run after ``tid`` (dependency-triggered) if they may."""
        if self._stopping:
            return
        for dependent in self._dependents.get(tid, ()):
            entry = self.tasks.get(dependent)
            if entry is None or entry.paused:
                continue
            if self._dependency_block(entry.task, finished=tid) is None:
                self._start_now(entry, "dependency", None)
