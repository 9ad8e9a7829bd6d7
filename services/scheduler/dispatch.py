"""Dispatching runs: when each run falls due, and what it is handed to.

The dispatcher owns the scheduled tasks' entries and the :class:`~.timers.TimerQueue`.
A task's timer fires :attr:`Runner.lead` ahead of its due time (plus its jitter); the
dispatcher then applies the misfire policy — due runs missed while the kernel was down
or the loop was blocked are coalesced to one run (``run_once``) or skipped (``skip``)
past the grace time, recorded as ``TaskMissed`` — computes the next due time, re-arms,
and hands the run to the :class:`~.runner.Runner`. It also starts retries at their time,
runs requested by an operator, and tasks without a trigger of their own once their
dependencies have finished (by the ``success`` or ``finished`` rule).
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from functools import partial

from kernel.events import Event, Recorded
from services.scheduler.events import TaskMissed, TaskSkipped
from services.scheduler.projection import TaskTable
from services.scheduler.runner import Runner, TaskEntry
from services.scheduler.specs import CompiledTask
from services.scheduler.timers import TimerQueue
from services.scheduler.triggers import catch_up

__all__ = ["Dispatcher"]

log = logging.getLogger("xcore.scheduler")


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
        self._timer = TimerQueue()
        self._stopping = False

    def start(self) -> None:
        self._timer.start()

    async def stop(self) -> None:
        self._stopping = True
        await self._timer.stop()
        await self.runner.stop()

    def disarm(self, tid: str) -> None:
        self._timer.cancel(tid)

    def run_now(self, entry: TaskEntry, cause: Recorded) -> None:
        """Start a run of ``entry`` now, as requested by ``cause``."""
        if not self._stopping:
            self._start_now(entry, "request", entry.next_due, cause)

    def _start_now(
        self, entry: TaskEntry, kind: str, next_run: float | None, cause: Recorded | None = None
    ) -> None:
        """A first attempt of ``entry``, due and started now (not from its trigger)."""
        now = time.time()
        self.runner.spawn(
            self.runner.run(
                entry,
                uuid.uuid4().hex,
                now,
                attempt=1,
                kind=kind,
                next_run=next_run,
                start_at=now,
                cause=cause,
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

    def arm(self, entry: TaskEntry) -> None:
        """Arm (or disarm) the timer of ``entry`` for its next due time."""
        task = entry.task
        if entry.paused or entry.next_due is None or self._stopping:
            self._timer.cancel(task.id)
            return
        due = entry.next_due
        offset = random.uniform(0, task.jitter) if task.jitter else 0.0
        self._timer.arm(
            task.id, due + offset - self.runner.lead, partial(self._on_due, task.id, due, offset)
        )

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
                skipped = TaskSkipped(
                    task=tid,
                    scheduled_for=scheduled_for,
                    reason=f"paused: retry (attempt {attempt}) dropped",
                    next_run=current.next_due,
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

        self._timer.arm(f"retry:{run_id}", retry_at - self.runner.lead, fire)

    def _on_due(self, tid: str, due: float, offset: float) -> None:
        entry = self.tasks.get(tid)
        if entry is None or entry.paused or entry.next_due != due:
            return
        task = entry.task
        assert task.trigger is not None
        now = time.time()
        count, last, nxt = catch_up(task.trigger, due, max(now, due))
        late = now - (last + offset)
        run_due: float | None = last
        missed = count - 1
        if task.misfire == "skip" and late > task.misfire_grace:
            run_due, missed = None, count
        entry.next_due = nxt
        self.arm(entry)
        pre: list[Event] = []
        if missed:
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
        if run_due is None:
            self.runner.spawn(self.runner.append(tid, pre))
            return
        kind = "misfire" if (missed or late > task.misfire_grace) else "schedule"
        self.runner.spawn(
            self.runner.run(
                entry,
                uuid.uuid4().hex,
                run_due,
                attempt=1,
                kind=kind,
                next_run=nxt,
                start_at=run_due + offset,
                pre=pre,
            )
        )

    def _dependency_block(self, task: CompiledTask) -> str | None:
        """Why ``task`` may not run now because of its dependencies (None: it may)."""
        for dep in task.depends_on:
            dep_entry = self.tasks.get(dep)
            if dep_entry is not None and dep_entry.active:
                return f"dependency {dep} is running"
            if dep_entry is not None:
                outcome = dep_entry.last_outcome
            else:
                row = self.table.tasks.get(dep)
                last = row.last if row is not None else None
                outcome = last.outcome if last is not None else None
                if outcome in ("running", "retrying"):
                    return f"dependency {dep} has not finished"
            if outcome is None:
                return f"dependency {dep} has not run yet"
            if task.depends_rule == "success" and outcome != "succeeded":
                return f"dependency {dep}: its latest run {outcome}"
        return None

    def _after_finish(self, tid: str) -> None:
        """Start the tasks that run after ``tid`` (dependency-triggered) if they may."""
        if self._stopping:
            return
        for dependent in self._dependents.get(tid, ()):
            entry = self.tasks.get(dependent)
            if entry is None or entry.paused:
                continue
            if self._dependency_block(entry.task) is None:
                self._start_now(entry, "dependency", None)
