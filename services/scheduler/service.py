"""The scheduler service: arms timers for registered tasks, runs them, records every step.

Life of a task: a plugin's ``PluginLoaded`` (or :meth:`SchedulerService.register`)
validates its declarations (refusals become ``TaskRejected``), resumes each task's next
due time from the task table projection (or computes the first one and records
``TaskScheduled``), and arms the timer. When a run falls due the service applies the
misfire policy, checks ``max_instances`` and dependencies, waits for a slot of the
global limit (priority first, then due time), records ``TaskStarted`` — durable before
the code starts, made a little ahead of the due time so the write does not delay it —
and then calls the function (sync functions in a worker thread) under its timeout.
The outcome is ``TaskSucceeded`` or ``TaskFailed`` (+ ``TaskRetryScheduled``).

At boot, runs the log shows in progress were cut by a dead process: each is recorded
as ``TaskFailed(kind="interrupted")`` before anything runs, and never re-run, so a
restart neither loses nor doubles a run.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import time
import traceback
import uuid
from collections.abc import Coroutine, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any

from kernel.events import Event, Recorded
from kernel.runtime import PluginRuntime
from kernel.sdk import TaskContext, TaskSpec, plugin_context_var, task_context_var
from services.loader.events import PluginLoaded, PluginReloaded, PluginUnloaded
from services.scheduler.config import SchedulerSettings
from services.scheduler.events import (
    TaskFailed,
    TaskMissed,
    TaskPaused,
    TaskPauseRequested,
    TaskRejected,
    TaskRequestRefused,
    TaskResumed,
    TaskResumeRequested,
    TaskRetryScheduled,
    TaskRunRequested,
    TaskScheduled,
    TaskSkipped,
    TaskStarted,
    TaskSucceeded,
    TaskUnscheduled,
    stream_of,
)
from services.scheduler.limits import PrioritySlots
from services.scheduler.projection import TaskTable
from services.scheduler.specs import (
    CompiledTask,
    TaskDeclarationError,
    check_dependencies,
    compile_spec,
)
from services.scheduler.timers import TimerQueue
from services.scheduler.triggers import catch_up

if TYPE_CHECKING:
    from kernel.kernel import Kernel

__all__ = ["Registration", "SchedulerService"]

log = logging.getLogger("xcore.scheduler")

_PLUGIN_EVENTS = (PluginLoaded, PluginUnloaded, PluginReloaded)
_REQUESTS = (TaskRunRequested, TaskPauseRequested, TaskResumeRequested)


@dataclass
class Registration:
    """What :meth:`SchedulerService.register` did: accepted ids, refused ids with reasons."""

    accepted: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)


@dataclass(eq=False)
class _Entry:
    task: CompiledTask
    next_due: float | None
    paused: bool = False
    #: run id -> the asyncio task running it
    active: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    #: "succeeded" | "failed" of the latest finished run (None: never ran)
    last_outcome: str | None = None


class TaskLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Adds ``run_id`` and ``task`` to every record (the text formatter prints extras)."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs


class SchedulerService:
    """Schedules and runs plugins' ``@task`` functions; see the module docstring."""

    name = "scheduler"
    order = 60

    def __init__(self, settings: SchedulerSettings | None = None) -> None:
        self._settings = settings
        self.settings = settings or SchedulerSettings()
        self.kernel: Kernel | None = None
        self.table = TaskTable()
        self._tasks: dict[str, _Entry] = {}
        self._plugins: dict[str, int] = {}
        self._dependents: dict[str, set[str]] = {}
        self._runs: dict[str, tuple[str, str, int, asyncio.Task[None]]] = {}
        self._cancel_reasons: dict[str, str] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._timer = TimerQueue()
        self._slots = PrioritySlots(self.settings.max_concurrency)
        self._executor: ThreadPoolExecutor | None = None
        #: How far ahead of the due time ``TaskStarted`` is written (adapts to the store).
        self.lead = 0.005
        self._append_ewma = 0.002
        self._stopping = False

    # -- life cycle -------------------------------------------------------------------

    async def start(self, kernel: Kernel, stack: AsyncExitStack) -> None:
        self.kernel = kernel
        if self._settings is None:
            self.settings = kernel.settings.section("scheduler", SchedulerSettings)
        self._slots = PrioritySlots(self.settings.max_concurrency)
        self._executor = ThreadPoolExecutor(
            max_workers=self.settings.threads or self.settings.max_concurrency,
            thread_name_prefix="xcore-task",
        )
        stack.callback(self._executor.shutdown, wait=False, cancel_futures=True)
        self.table = await kernel.add_projection(TaskTable())
        await self._record_interrupted()
        self._timer.start()
        stack.push_async_callback(self._stop)

        from services.scheduler.admin import build_router

        kernel.http.add_admin_router(build_router(self))
        kernel.http.add_health_check("scheduler", self._health)
        position = await kernel.store.last_position()
        await kernel.subscribe(self._on_event, start=position, types=[*_PLUGIN_EVENTS, *_REQUESTS])
        latest: dict[str, PluginRuntime] = {}
        for rt in kernel.plugins.all():
            if rt.name not in latest or rt.generation > latest[rt.name].generation:
                latest[rt.name] = rt
        for rt in latest.values():
            await self._load_runtime(rt)

    async def _stop(self) -> None:
        self._stopping = True
        await self._timer.stop()
        running = []
        for run_id, (_, _, _, task) in list(self._runs.items()):
            self._cancel_reasons[run_id] = "the kernel stopped while the run was in progress"
            task.cancel()
            running.append(task)
        if running:
            await asyncio.wait(running, timeout=5)
        for bg in list(self._background):
            bg.cancel()
        if self._background:
            await asyncio.wait(list(self._background), timeout=5)

    async def _health(self) -> tuple[bool, dict[str, Any]]:
        return True, {
            "tasks": len(self._tasks),
            "running": self._slots.busy,
            "waiting": self._slots.waiting,
            "lead_ms": round(self.lead * 1000, 3),
        }

    async def _record_interrupted(self) -> None:
        """Runs left in progress by a previous process are failed, never re-run."""
        kernel = self._kernel()
        pending = []
        for row in self.table.tasks.values():
            for info in row.running.values():
                event = TaskFailed(
                    task=row.id,
                    run_id=info.run_id,
                    attempt=info.attempt,
                    error="interrupted: the process stopped while this run was in progress",
                    kind="interrupted",
                )
                log.warning("task %s: run %s was interrupted by a restart", row.id, info.run_id)
                pending.append(kernel.append(event, stream=stream_of(row.id), actor="scheduler"))
        if pending:
            await asyncio.gather(*pending)
            await kernel.settle()

    def _kernel(self) -> Kernel:
        if self.kernel is None:
            raise RuntimeError("the scheduler service is not started")
        return self.kernel

    # -- registration -------------------------------------------------------------------

    async def register(
        self,
        plugin: str,
        specs: Iterable[TaskSpec] | Mapping[str, TaskSpec],
        *,
        generation: int = 0,
        runtime: PluginRuntime | None = None,
        strict: bool | None = None,
    ) -> Registration:
        """Validate and schedule ``plugin``'s tasks, replacing those it had before.

        Refused declarations are recorded as ``TaskRejected`` (and logged) with the
        plugin, the task and the reason; the others are scheduled, unless ``strict``
        (default: the ``strict`` setting) refuses them all with the first refusal.
        """
        kernel = self._kernel()
        items = list(specs.values()) if isinstance(specs, Mapping) else list(specs)
        compiled: dict[str, CompiledTask] = {}
        refused: dict[str, str] = {}
        for spec in items:
            tid = f"{plugin}.{getattr(spec, 'name', '?')}"
            try:
                task = compile_spec(
                    plugin,
                    spec,
                    generation=generation,
                    runtime=runtime,
                    default_tz=self.settings.default_timezone,
                )
            except TaskDeclarationError as exc:
                refused[tid] = str(exc)
                continue
            if tid in compiled:
                refused[tid] = "declared twice"
                continue
            compiled[tid] = task
        existing = {t: e.task.depends_on for t, e in self._tasks.items() if e.task.plugin != plugin}
        known = [t for t, row in self.table.tasks.items() if row.trigger and row.plugin != plugin]
        candidates = {t: c for t, c in compiled.items() if t not in refused}
        refused.update(check_dependencies(candidates, existing, known))
        strict = self.settings.strict if strict is None else strict
        if strict and refused:
            first = next(iter(refused.items()))
            for tid in compiled:
                refused.setdefault(
                    tid,
                    f"not scheduled: strict plugin, and task {first[0]} was refused ({first[1]})",
                )
        accepted = {t: c for t, c in compiled.items() if t not in refused}
        for tid, reason in refused.items():
            log.error("plugin %r: task %r refused: %s", plugin, tid, reason)
        await asyncio.gather(
            *(
                kernel.append(
                    TaskRejected(task=tid, plugin=plugin, generation=generation, reason=reason),
                    stream=stream_of(tid),
                    actor="scheduler",
                )
                for tid, reason in refused.items()
            )
        )
        gone = [t for t, e in self._tasks.items() if e.task.plugin == plugin and t not in accepted]
        for tid in gone:
            await self._unschedule(tid, generation, "no longer declared by its plugin")
        now = time.time()
        await asyncio.gather(*(self._schedule(task, now) for task in accepted.values()))
        self._plugins[plugin] = generation
        self._index_dependents()
        return Registration(accepted=list(accepted), refused=refused)

    async def unregister(self, plugin: str, reason: str = "unregistered") -> list[str]:
        """Stop scheduling ``plugin``'s tasks and cancel its runs in progress."""
        gen = self._plugins.pop(plugin, 0)
        ids = [t for t, e in self._tasks.items() if e.task.plugin == plugin]
        self._cancel_runs(plugin, None, f"cancelled: {reason}")
        for tid in ids:
            await self._unschedule(tid, gen, reason)
        self._index_dependents()
        return ids

    async def _schedule(self, task: CompiledTask, now: float) -> None:
        tid = task.id
        old = self._tasks.get(tid)
        row = self.table.tasks.get(tid)
        desc = task.trigger_description
        fresh = task.trigger.first(now) if task.trigger is not None else None
        if old is not None and old.task.trigger_description == desc:
            next_due, paused = old.next_due, old.paused
        elif old is None and row is not None and row.trigger == desc:
            next_due, paused = row.next_run, row.paused
            if next_due is None and task.trigger is not None and task.trigger.recurring:
                next_due = fresh
        else:
            next_due = fresh
            paused = old.paused if old is not None else bool(row and row.paused)
        entry = old if old is not None else _Entry(task=task, next_due=next_due)
        entry.task, entry.next_due, entry.paused = task, next_due, paused
        if (
            old is None
            and row is not None
            and row.last is not None
            and row.last.outcome in ("succeeded", "failed")
        ):
            entry.last_outcome = row.last.outcome
        changed = (
            row is None
            or not row.scheduled
            or row.trigger != desc
            or row.generation != task.generation
            or row.priority != task.priority
            or row.next_run != next_due
            or list(row.depends_on) != list(task.depends_on)
        )
        self._tasks[tid] = entry
        if changed:
            await self._append(
                tid,
                [
                    TaskScheduled(
                        task=tid,
                        plugin=task.plugin,
                        generation=task.generation,
                        trigger=desc,
                        next_run=next_due,
                        priority=task.priority,
                        depends_on=list(task.depends_on),
                        max_instances=task.max_instances,
                        misfire=task.misfire,
                    )
                ],
            )
        self._arm(entry)
        if old is None and row is not None:
            for run_id, (attempt, retry_at, scheduled_for) in row.retries.items():
                self._arm_retry(entry, run_id, attempt, retry_at, scheduled_for)

    async def _unschedule(self, tid: str, generation: int, reason: str) -> None:
        entry = self._tasks.pop(tid, None)
        if entry is None:
            return
        self._timer.cancel(tid)
        await self._append(
            tid,
            [
                TaskUnscheduled(
                    task=tid, plugin=entry.task.plugin, generation=generation, reason=reason
                )
            ],
        )

    def _index_dependents(self) -> None:
        index: dict[str, set[str]] = {}
        for tid, entry in self._tasks.items():
            if entry.task.trigger is None:
                for dep in entry.task.depends_on:
                    index.setdefault(dep, set()).add(tid)
        self._dependents = index

    # -- plugin events and requests -------------------------------------------------------

    async def _on_event(self, r: Recorded) -> None:
        kernel = self._kernel()
        d = r.data
        if r.type in ("PluginLoaded", "PluginReloaded"):
            rt = kernel.plugins.find(d["name"], d["generation"])
            if rt is None:
                log.warning(
                    "plugin %r generation %s is not in the plugin directory; its tasks "
                    "cannot be scheduled",
                    d["name"],
                    d["generation"],
                )
                return
            if self._plugins.get(rt.name) != rt.generation:
                await self._load_runtime(rt)
        elif r.type == "PluginUnloaded":
            name, gen = d["name"], d["generation"]
            reason = f"plugin {name!r} generation {gen} was unloaded"
            self._cancel_runs(name, gen, f"cancelled: {reason}")
            if self._plugins.get(name) == gen:
                del self._plugins[name]
                for tid in [t for t, e in self._tasks.items() if e.task.plugin == name]:
                    await self._unschedule(tid, gen, reason)
                self._index_dependents()
        elif r.type == "TaskRunRequested":
            entry = self._tasks.get(d["task"])
            if entry is None:
                await self._refuse(r, "no such task is scheduled")
                return
            now = time.time()
            self._spawn(
                self._run(
                    entry,
                    uuid.uuid4().hex,
                    now,
                    attempt=1,
                    kind="request",
                    next_run=entry.next_due,
                    start_at=now,
                    cause=r,
                )
            )
        elif r.type == "TaskPauseRequested":
            entry = self._tasks.get(d["task"])
            if entry is None:
                await self._refuse(r, "no such task is scheduled")
                return
            entry.paused = True
            self._timer.cancel(entry.task.id)
            await self._append(entry.task.id, [TaskPaused(task=entry.task.id)], cause=r)
        elif r.type == "TaskResumeRequested":
            entry = self._tasks.get(d["task"])
            if entry is None:
                await self._refuse(r, "no such task is scheduled")
                return
            now = time.time()
            trigger = entry.task.trigger
            if entry.paused and (entry.next_due is None or entry.next_due <= now):
                entry.next_due = (
                    trigger.next_after(now) if trigger is not None and trigger.recurring else None
                )
            entry.paused = False
            await self._append(
                entry.task.id, [TaskResumed(task=entry.task.id, next_run=entry.next_due)], cause=r
            )
            self._arm(entry)

    async def _refuse(self, r: Recorded, reason: str) -> None:
        await self._append(
            r.data["task"], [TaskRequestRefused(task=r.data["task"], reason=reason)], cause=r
        )

    async def _load_runtime(self, rt: PluginRuntime) -> None:
        if self._plugins.get(rt.name, -1) > rt.generation:
            return  # an older generation announced late: the newer one stays
        strict = getattr(rt.module, "XCORE_STRICT_TASKS", None) if rt.module else None
        result = await self.register(
            rt.name,
            rt.tasks,
            generation=rt.generation,
            runtime=rt,
            strict=strict if isinstance(strict, bool) else None,
        )
        if result.accepted or result.refused:
            log.info(
                "plugin %r generation %s: %d task(s) scheduled, %d refused",
                rt.name,
                rt.generation,
                len(result.accepted),
                len(result.refused),
            )

    def _cancel_runs(self, plugin: str, generation: int | None, reason: str) -> None:
        for run_id, (_, p, gen, task) in list(self._runs.items()):
            if p == plugin and (generation is None or gen == generation):
                self._cancel_reasons[run_id] = reason
                task.cancel()

    # -- timing -------------------------------------------------------------------------

    def _arm(self, entry: _Entry) -> None:
        task = entry.task
        if entry.paused or entry.next_due is None or self._stopping:
            self._timer.cancel(task.id)
            return
        due = entry.next_due
        offset = random.uniform(0, task.jitter) if task.jitter else 0.0
        self._timer.arm(
            task.id, due + offset - self.lead, partial(self._on_due, task.id, due, offset)
        )

    def _arm_retry(
        self, entry: _Entry, run_id: str, attempt: int, retry_at: float, scheduled_for: float
    ) -> None:
        def fire() -> None:
            current = self._tasks.get(entry.task.id)
            if current is None:
                return
            self._spawn(
                self._run(
                    current,
                    run_id,
                    scheduled_for,
                    attempt=attempt,
                    kind="retry",
                    next_run=current.next_due,
                    start_at=retry_at,
                )
            )

        self._timer.arm(f"retry:{run_id}", retry_at - self.lead, fire)

    def _on_due(self, tid: str, due: float, offset: float) -> None:
        entry = self._tasks.get(tid)
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
        self._arm(entry)
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
            self._spawn(self._append(tid, pre))
            return
        kind = "misfire" if (missed or late > task.misfire_grace) else "schedule"
        self._spawn(
            self._run(
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

    def _note_append(self, seconds: float) -> None:
        self._append_ewma = 0.9 * self._append_ewma + 0.1 * seconds
        self.lead = min(self.settings.max_lead_ms / 1000, 2 * self._append_ewma + 0.002)

    # -- running ------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        bg = asyncio.create_task(coro)
        self._background.add(bg)
        bg.add_done_callback(self._reap)

    def _reap(self, bg: asyncio.Task[Any]) -> None:
        self._background.discard(bg)
        if not bg.cancelled() and bg.exception() is not None:
            log.error("scheduler background step failed", exc_info=bg.exception())

    async def _append(self, tid: str, events: list[Event], cause: Recorded | None = None) -> None:
        if events:
            await self._kernel().append(
                events, stream=stream_of(tid), actor="scheduler", cause=cause
            )

    def _dependency_block(self, task: CompiledTask) -> str | None:
        for dep in task.depends_on:
            dep_entry = self._tasks.get(dep)
            if dep_entry is not None and dep_entry.active:
                return f"dependency {dep} is running"
            if dep_entry is not None:
                outcome = dep_entry.last_outcome
            else:
                row = self.table.tasks.get(dep)
                last = row.last if row is not None else None
                outcome = last.outcome if last is not None else None
            if outcome is None:
                return f"dependency {dep} has not run yet"
            if task.depends_rule == "success" and outcome != "succeeded":
                return f"dependency {dep}: its latest run {outcome}"
        return None

    async def _run(
        self,
        entry: _Entry,
        run_id: str,
        scheduled_for: float,
        *,
        attempt: int,
        kind: str,
        next_run: float | None,
        start_at: float,
        cause: Recorded | None = None,
        pre: list[Event] | None = None,
    ) -> None:
        task = entry.task
        tid = task.id
        events: list[Event] = list(pre or ())
        reason = None
        if len(entry.active) >= task.max_instances:
            reason = f"max_instances ({task.max_instances}) reached: a run is still in progress"
        elif kind != "request" and task.depends_on:
            reason = self._dependency_block(task)
        if reason is not None:
            events.append(
                TaskSkipped(
                    task=tid, scheduled_for=scheduled_for, reason=reason, next_run=entry.next_due
                )
            )
            await self._append(tid, events, cause)
            return
        me = asyncio.current_task()
        assert me is not None
        entry.active[run_id] = me
        self._runs[run_id] = (tid, task.plugin, task.generation, me)
        acquired = started = False
        t_start = time.perf_counter()
        try:
            await self._slots.acquire(task.priority, scheduled_for)
            acquired = True
            events.append(
                TaskStarted(
                    task=tid,
                    run_id=run_id,
                    scheduled_for=scheduled_for,
                    attempt=attempt,
                    trigger=kind,
                    next_run=next_run,
                )
            )
            t0 = time.perf_counter()
            await self._append(tid, events, cause)
            self._note_append(time.perf_counter() - t0)
            started = True
            delay = start_at - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            t_start = time.perf_counter()
            error = await self._execute(task, run_id, scheduled_for, attempt)
        except asyncio.CancelledError:
            if started:
                why = self._cancel_reasons.pop(run_id, "cancelled")
                await self._append(
                    tid,
                    [
                        TaskFailed(
                            task=tid,
                            run_id=run_id,
                            attempt=attempt,
                            error=why,
                            duration_ms=(time.perf_counter() - t_start) * 1000,
                            kind="cancelled",
                        )
                    ],
                )
                entry.last_outcome = "failed"
            raise
        finally:
            if acquired:
                self._slots.release()
            entry.active.pop(run_id, None)
            self._runs.pop(run_id, None)
        duration_ms = (time.perf_counter() - t_start) * 1000
        if error is None:
            entry.last_outcome = "succeeded"
            await self._append(
                tid,
                [TaskSucceeded(task=tid, run_id=run_id, attempt=attempt, duration_ms=duration_ms)],
            )
            self._after_finish(tid, cause)
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
        else:
            entry.last_outcome = "failed"
        await self._append(tid, done)
        if retry:
            self._arm_retry(entry, run_id, attempt + 1, retry_at, scheduled_for)
        else:
            self._after_finish(tid, cause)

    async def _execute(
        self, task: CompiledTask, run_id: str, scheduled_for: float, attempt: int
    ) -> tuple[str, str, str] | None:
        """Call the task's function; None on success, else (kind, error, traceback)."""
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
        task_token = task_context_var.set(ctx)
        plugin_token = plugin_context_var.set(plugin_ctx) if plugin_ctx is not None else None
        try:
            timeout = asyncio.timeout(task.timeout)
            try:
                async with timeout:
                    if task.is_async:
                        await task.fn()
                    elif rt is not None and rt.mode == "sandboxed" and rt.run_sync is not None:
                        await rt.run_sync(task.fn)
                    else:
                        loop = asyncio.get_running_loop()
                        call = contextvars.copy_context().run
                        await loop.run_in_executor(self._executor, call, task.fn)
            except TimeoutError as exc:
                if timeout.expired():
                    log.warning("task %s run %s timed out after %gs", task.id, run_id, task.timeout)
                    return "timeout", f"timed out after {task.timeout:g}s", ""
                return "error", _describe(exc), "".join(traceback.format_exception(exc))
            except Exception as exc:
                log.warning("task %s run %s failed: %s", task.id, run_id, _describe(exc))
                return "error", _describe(exc), "".join(traceback.format_exception(exc))
            return None
        finally:
            task_context_var.reset(task_token)
            if plugin_token is not None:
                plugin_context_var.reset(plugin_token)

    def _after_finish(self, tid: str, cause: Recorded | None) -> None:
        """Start the tasks that run after ``tid`` (dependency-triggered) if they may."""
        for dependent in self._dependents.get(tid, ()):
            entry = self._tasks.get(dependent)
            if entry is None or entry.paused:
                continue
            if self._dependency_block(entry.task) is not None:
                continue
            now = time.time()
            self._spawn(
                self._run(
                    entry,
                    uuid.uuid4().hex,
                    now,
                    attempt=1,
                    kind="dependency",
                    next_run=None,
                    start_at=now,
                )
            )

    # -- read side (admin API) ------------------------------------------------------------

    def is_scheduled(self, task_id: str) -> bool:
        return task_id in self._tasks

    def running(self, task_id: str) -> int:
        entry = self._tasks.get(task_id)
        return len(entry.active) if entry is not None else 0


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
