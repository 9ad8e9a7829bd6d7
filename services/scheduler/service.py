"""The scheduler service: its life cycle, which tasks are scheduled, restart recovery.

Life of a task: a plugin's ``PluginLoaded`` (or :meth:`SchedulerService.register`)
validates its declarations (refusals become ``TaskRejected``), resumes each task's next
due time from the task table projection (or computes the first one and records
``TaskScheduled``), and hands it to the :class:`~.dispatch.Dispatcher`, which arms its
timer, applies the misfire policy when it falls due and starts the run in the
:class:`~.runner.Runner` (which executes it and records its outcome). ``PluginUnloaded`` unschedules a
plugin's tasks and cancels its runs; requests (run now, pause, resume) arrive as events.

At boot, runs the log shows in progress were cut by a dead process, before anything
runs. A run whose code may have started is recorded ``TaskFailed(kind="interrupted")``
and never re-run. A run claimed ahead of its instant (``TaskStarted`` is written a lead
ahead) when the boot's clock is still before that instant cannot have started — its
code waits for the instant on the wall clock —: it is recorded ``TaskReleased`` and its
instant runs again (a timed run's ``next_run`` goes back to it, a retry is pending
again), under a claim key derived from the released one. So a restart neither loses nor
doubles a run.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Iterable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kernel.events import Event, Recorded, new_id
from kernel.runtime import PluginRuntime
from kernel.sdk import TaskSpec
from services.loader.events import PluginLoaded, PluginReloaded, PluginUnloaded
from services.scheduler.claim import releasable, release
from services.scheduler.config import SchedulerSettings
from services.scheduler.dispatch import Dispatcher
from services.scheduler.events import (
    ScheduleAdded,
    ScheduleApplied,
    ScheduleChanged,
    ScheduleConflict,
    ScheduleRemoved,
    TaskCancelAnswered,
    TaskCancelRequested,
    TaskFailed,
    TaskPaused,
    TaskPauseRequested,
    TaskRejected,
    TaskReleased,
    TaskRequestRefused,
    TaskResumed,
    TaskResumeRequested,
    TaskRunAccepted,
    TaskRunRequested,
    TaskScheduled,
    TaskUnscheduled,
    stream_of,
)
from services.scheduler.gcpolicy import GcPolicy
from services.scheduler.projection import TaskTable
from services.scheduler.runner import TaskEntry, wake_turns
from services.scheduler.schedules import (
    BOOK_EVENTS,
    ChangeConflict,
    ScheduleBook,
    declared_key,
    expanded,
    with_trigger,
)
from services.scheduler.specs import (
    CompiledTask,
    TaskDeclarationError,
    compile_plugin,
    compile_spec,
)

if TYPE_CHECKING:
    from kernel.kernel import Kernel
    from kernel.subscriptions import Subscription

__all__ = ["Registration", "SchedulerService"]

log = logging.getLogger("xcore.scheduler")

_PLUGIN_EVENTS = (PluginLoaded, PluginUnloaded, PluginReloaded)
_REQUESTS = (TaskRunRequested, TaskPauseRequested, TaskResumeRequested, TaskCancelRequested)
_PLUGIN_TYPES = frozenset(e.type_name for e in _PLUGIN_EVENTS)
_CHANGES = (ScheduleAdded, ScheduleChanged, ScheduleRemoved)


@dataclass
class Registration:
    """What :meth:`SchedulerService.register` did: accepted ids, refused ids with reasons."""

    accepted: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)


class SchedulerService:
    """Schedules and runs plugins' ``@task`` functions; see the module docstring."""

    name = "scheduler"
    order = 60

    def __init__(self, settings: SchedulerSettings | None = None) -> None:
        #: Given settings win over the ``services.scheduler`` section read at start.
        self._settings_given = settings is not None
        self.settings = settings or SchedulerSettings()
        self.kernel: Kernel | None = None
        self._sub: Subscription | None = None
        self._plugins: dict[str, int] = {}
        self._dispatch = Dispatcher(TaskTable())
        self._runner = self._dispatch.runner
        #: task id -> its entry (shared with the dispatcher)
        self._tasks: dict[str, TaskEntry] = self._dispatch.tasks
        self._gc = GcPolicy(enabled=False)
        #: schedules added or changed at runtime (admin API), folded from the log
        self._book = ScheduleBook()
        #: plugin -> what it registered last (declarations, generation, runtime, strict),
        #: to register it again when a runtime change concerns it
        self._declared: dict[
            str, tuple[list[TaskSpec], int, PluginRuntime | None, bool | None]
        ] = {}

    @property
    def table(self) -> TaskTable:
        """The task table projection (the dispatcher's)."""
        return self._dispatch.table

    # -- life cycle -------------------------------------------------------------------

    async def start(self, kernel: Kernel, stack: AsyncExitStack) -> None:
        self.kernel = kernel
        if not self._settings_given:
            self.settings = kernel.settings.section("scheduler", SchedulerSettings)
        self._gc = GcPolicy(
            self.settings.manage_gc,
            next_due=self._dispatch.next_deadline,
            quiet_for=self._dispatch.quiet_for,
        )
        self._runner.start(kernel, self.settings, stack)
        self._dispatch.max_catch_up = self.settings.max_catch_up_runs
        self._dispatch.table = await kernel.add_projection(TaskTable())
        await self._record_interrupted()
        self._dispatch.start()
        stack.push_async_callback(self._stop)

        from services.scheduler.admin import build_router

        kernel.http.add_admin_router(build_router(self))
        kernel.http.add_health_check("scheduler", self._health)
        position = await kernel.store.last_position()
        self._book.fold(await kernel.read(types=BOOK_EVENTS))
        self._sub = await kernel.subscribe(
            self._on_event,
            start=position,
            types=[*_PLUGIN_EVENTS, *_REQUESTS, *_CHANGES, TaskFailed, TaskReleased],
        )
        latest: dict[str, PluginRuntime] = {}
        for rt in kernel.plugins.all():
            if rt.name not in latest or rt.generation > latest[rt.name].generation:
                latest[rt.name] = rt
        for rt in latest.values():
            await self._load_runtime(rt)

    async def caught_up(self, timeout: float = 5.0) -> None:
        """Wait (at most ``timeout`` s) until this scheduler has handled every event
        already in the log.

        A reload answers once its plugin is loaded; this scheduler registers the new
        tasks a step later, in its own subscription. A request naming one of them in
        between (reload, then run at once: a script, the CLI) must not be refused as
        unknown: the admin API calls this before it answers "no task".
        """
        sub = self._sub
        if sub is None:
            return
        head = await self._kernel().store.last_position()
        try:
            await sub.wait_for(head, timeout)
        except (TimeoutError, RuntimeError) as exc:
            log.warning("scheduler: answering without its latest events (%s)", exc)

    async def _stop(self) -> None:
        # No plugin event or request may start anything once the runner stops (the
        # kernel stops subscriptions only after every service has stopped).
        sub, self._sub = self._sub, None
        if sub is not None:
            await self._kernel().unsubscribe(sub)
        await self._dispatch.stop()
        await self._gc.stop()

    async def _health(self) -> tuple[bool, dict[str, Any]]:
        return True, {
            "tasks": len(self._tasks),
            "running": self._runner.slots.busy,
            "waiting": self._runner.slots.waiting,
            "lead_ms": round(self._runner.lead * 1000, 3),
            "gc_freezes": self._gc.freezes,
        }

    async def _record_interrupted(self) -> None:
        """Runs left in progress by a previous process: released if their instant has
        not come (their code cannot have run; the instant runs again), else failed as
        interrupted and never re-run (module docstring)."""
        kernel = self._kernel()
        pending = []
        now = time.time()
        for row in self.table.tasks.values():
            rewind = row.next_run
            for info in list(row.running.values()):
                if kernel.placement.shared and info.node not in (None, kernel.node):
                    continue  # another node's run (a cluster): the cluster service watches it
                event: Event
                due = info.scheduled_for if info.due is None else info.due
                if info.claim is not None and releasable(info.trigger, due, now):
                    if info.trigger == "schedule":
                        rewind = due if rewind is None else min(rewind, due)
                    event = release(
                        task=row.id,
                        run_id=info.run_id,
                        scheduled_for=info.scheduled_for,
                        attempt=info.attempt,
                        trigger=info.trigger,
                        claim=info.claim,
                        due=due,
                        next_run=rewind,
                        why=(
                            "the process stopped after claiming this run ahead of its "
                            f"instant and came back {due - now:.3f} s before it"
                        ),
                    )
                    log.warning(
                        "task %s: run %s was claimed ahead of its instant by a process "
                        "that stopped; released, its instant runs again",
                        row.id,
                        info.run_id,
                    )
                else:
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

    def _take_released(self, d: dict[str, Any]) -> None:
        """A timed run another node released (it stopped between its early claim and
        the instant): this node arms that instant again if it is still to come, so the
        cluster runs it (under the key derived from the released one) although this
        node's timer for it had already fired and seen it claimed."""
        entry = self._tasks.get(d["task"])
        due = d["scheduled_for"]
        if (
            entry is None
            or d.get("retry_at") is not None
            or entry.catch_up is not None
            or entry.paused
            or self._runner.closed
            or due <= time.time()
        ):
            return
        if entry.next_due is None or due < entry.next_due:
            entry.next_due = due
            self._dispatch.arm(entry)

    def _retry_lost_run(self, d: dict[str, Any]) -> None:
        """A run of a lost node (a cluster) is retried here if its task has retries left.

        Every surviving node arms the same retry; its claim (same slot, same attempt)
        lets one of them run it.
        """
        entry = self._tasks.get(d["task"])
        due = d.get("scheduled_for")
        if entry is None or due is None or d["attempt"] > entry.task.retries:
            return
        retry_at = time.time() + entry.task.retry_backoff(d["attempt"])
        self._dispatch.arm_retry(entry, d["run_id"], d["attempt"] + 1, retry_at, due)

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
        declared = list(specs.values()) if isinstance(specs, Mapping) else list(specs)
        self._declared[plugin] = (declared, generation, runtime, strict)
        merged = self._book.merge(plugin, declared)
        for tid, key, change in merged.conflicts:
            log.warning(
                "task %s: its declaration changed since a runtime change was made to it; "
                "the declaration wins, the change is dropped",
                tid,
            )
            self._book.apply("ScheduleConflict", {"task": tid})
            await self._runner.append(
                tid,
                [
                    ScheduleConflict(
                        task=tid,
                        plugin=plugin,
                        generation=generation,
                        declared=key,
                        runtime={k: v for k, v in change.items() if k != "declared"},
                    )
                ],
            )
        items = merged.specs
        compile_ = functools.partial(
            compile_plugin,
            plugin,
            items,
            generation=generation,
            runtime=runtime,
            default_tz=self.settings.default_timezone,
            existing={
                t: e.task.depends_on for t, e in self._tasks.items() if e.task.plugin != plugin
            },
            known=[
                t for t, row in self.table.tasks.items() if row.trigger and row.plugin != plugin
            ],
            strict=self.settings.strict if strict is None else strict,
            # every node computes the same due times (see ``triggers.on_grid``)
            grid=kernel.placement.shared,
        )
        # Declarations are compiled in a worker thread: many of them (a plugin with
        # thousands of schedules), or one costly trigger (an ``all`` whose parts rarely
        # meet searches up to 10,000 steps), would otherwise stall HTTP and the runs.
        accepted, refused = await asyncio.to_thread(compile_)
        refused.update(merged.broken)
        for tid, compiled in accepted.items():
            if tid in self._book.added:
                compiled.source = "runtime"
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
        again = plugin in self._plugins or bool(gone)  # its former objects may be garbage
        self._plugins[plugin] = generation
        self._dispatch.index_dependents()
        self._gc.poke(frees=again)
        return Registration(accepted=list(accepted), refused=refused)

    async def unregister(
        self, plugin: str, reason: str = "unregistered", generation: int | None = None
    ) -> list[str]:
        """Stop scheduling ``plugin``'s tasks and cancel its runs in progress.

        With ``generation``, only that generation's runs are cancelled, and its tasks are
        unscheduled only if it is the generation scheduled now (a newer one keeps them).
        """
        self._runner.cancel_runs(plugin, generation, f"cancelled: {reason}")
        if generation is not None and self._plugins.get(plugin) != generation:
            return []
        current = self._plugins.pop(plugin, 0)
        # (its declarations hold its functions, and through them its generation)
        self._declared.pop(plugin, None)
        ids = [t for t, e in self._tasks.items() if e.task.plugin == plugin]
        for tid in ids:
            await self._unschedule(tid, current, reason)
        self._dispatch.index_dependents()
        self._gc.poke()
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
        entry = old if old is not None else TaskEntry(task=task, next_due=next_due)
        entry.task, entry.next_due, entry.paused = task, next_due, paused
        if old is not None:
            wake_turns(entry)  # a raised max_instances lets waiting runs go now
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
            await self._runner.append(
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
                        coalesce=task.coalesce,
                        source=task.source,
                    )
                ],
            )
        if old is None and row is not None:
            # Retries first: one due at the same instant as the task's next run belongs
            # to an earlier run, so it goes first (the other waits for its turn).
            for run_id, (attempt, retry_at, scheduled_for) in row.retries.items():
                entry.retrying.add(run_id)
                self._dispatch.arm_retry(entry, run_id, attempt, retry_at, scheduled_for)
        self._dispatch.arm(entry)

    async def _unschedule(self, tid: str, generation: int, reason: str) -> None:
        entry = self._tasks.pop(tid, None)
        if entry is None:
            return
        entry.removed = True  # a run claimed ahead of its instant runs nothing
        self._dispatch.disarm(tid)
        await self._runner.append(
            tid,
            [
                TaskUnscheduled(
                    task=tid, plugin=entry.task.plugin, generation=generation, reason=reason
                )
            ],
        )

    # -- plugin events and requests -------------------------------------------------------

    async def _on_event(self, r: Recorded) -> None:
        kernel = self._kernel()
        d = r.data
        if r.type in _PLUGIN_TYPES and kernel.placement.shared and r.meta.node != kernel.node:
            return  # another node's plugins (a cluster): its own scheduler follows them
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
            await self.unregister(name, f"plugin {name!r} generation {gen} was unloaded", gen)
        elif r.type == "TaskFailed":
            if d.get("kind") == "node_lost":
                # this node may be the one presumed dead (paused past stale_after_s):
                # the run is failed and retried on the survivors, so its copy here stops
                # (recorded as cancelled) rather than finishing a run already failed
                if (
                    self._runner.cancel_run(
                        d["task"],
                        d["run_id"],
                        f"this node was recorded lost by {r.meta.node} while it ran this "
                        "run; it is retried on the nodes that saw it live",
                    )
                    == "not_cancellable"
                ):
                    log.error(
                        "task %s run %s was failed as node_lost by %s but its sync code "
                        "cannot be stopped here: it runs twice",
                        d["task"],
                        d["run_id"],
                        r.meta.node,
                    )
                self._retry_lost_run(d)
        elif r.type == "TaskReleased":
            if kernel.placement.shared and r.meta.node != kernel.node:
                self._take_released(d)
        elif r.type == "TaskRunRequested":
            entry = self._tasks.get(d["task"])
            if entry is None:
                await self._refuse(r, "no such task is scheduled")
                return
            run_id = new_id()
            # The acceptance is durable before the run can start: the log reads
            # request -> accepted -> started -> outcome.
            position = self._runner.queue_position(entry)
            await self._runner.append(
                entry.task.id,
                [TaskRunAccepted(task=entry.task.id, run_id=run_id, queue_position=position)],
                cause=r,
            )
            self._dispatch.run_now(entry, run_id, r.meta.id)
        elif r.type == "TaskCancelRequested":
            if d["task"] not in self._tasks:
                await self._refuse(r, "no such task is scheduled")
                return
            status = self._runner.cancel_run(
                d["task"], d["run_id"], f"cancelled by {r.meta.actor or 'an operator'}"
            )
            await self._runner.append(
                d["task"],
                [TaskCancelAnswered(task=d["task"], run_id=d["run_id"], status=status)],
                cause=r,
            )
        elif r.type in ("ScheduleAdded", "ScheduleChanged", "ScheduleRemoved"):
            await self._apply_change(r)
        elif r.type == "TaskPauseRequested":
            entry = self._tasks.get(d["task"])
            if entry is None:
                await self._refuse(r, "no such task is scheduled")
                return
            entry.paused = True
            self._dispatch.disarm(entry.task.id)
            await self._runner.append(entry.task.id, [TaskPaused(task=entry.task.id)], cause=r)
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
            await self._runner.append(
                entry.task.id, [TaskResumed(task=entry.task.id, next_run=entry.next_due)], cause=r
            )
            self._dispatch.arm(entry)

    async def _apply_change(self, r: Recorded) -> None:
        """A runtime schedule change: fold it, register its plugin again, answer."""
        tid = r.data["task"]
        plugin = r.data.get("plugin") or tid.split(".", 1)[0]
        self._book.apply(r.type, r.data)
        if r.type == "ScheduleRemoved" and tid in self._tasks:
            await self._unschedule(tid, self._plugins.get(plugin, 0), "removed at runtime")
            self._dispatch.index_dependents()
        elif plugin in self._declared and plugin in self._plugins:
            declared, generation, runtime, strict = self._declared[plugin]
            result = await self.register(
                plugin, declared, generation=generation, runtime=runtime, strict=strict
            )
            if tid in result.refused:
                await self._refuse(r, result.refused[tid])
                return
        entry = self._tasks.get(tid)
        await self._runner.append(
            tid,
            [
                ScheduleApplied(
                    task=tid,
                    next_run=entry.next_due if entry is not None else None,
                    scheduled=entry is not None,
                )
            ],
            cause=r,
        )

    def check_change(self, kind: str, tid: str, body: dict[str, Any]) -> Event:
        """The event recording a runtime change, once it is known to compile; raises
        :class:`TaskDeclarationError` (the reason) or ``LookupError`` (unknown task)."""
        plugin, _, name = tid.partition(".")
        trigger = body.get("trigger")
        if (trigger is None and kind == "add") or (
            trigger is not None and not isinstance(trigger, Mapping)
        ):
            raise TaskDeclarationError(
                "trigger: expected a mapping like {'cron': '0 * * * *'} or {'every': '30s'}"
            )
        for key, kind_ in (("args", list), ("kwargs", dict)):
            if body.get(key) is not None and not isinstance(body[key], kind_):
                raise TaskDeclarationError(f"{key}: expected a {kind_.__name__}")
        if plugin not in self._declared:
            raise LookupError(f"plugin {plugin!r} has no tasks scheduled here")
        declared, _, runtime, _ = self._declared[plugin]
        by_name = {s.name: s for s in expanded(declared) if isinstance(s, TaskSpec)}
        if kind == "add":
            if tid in self._tasks or tid in self._book.added:
                raise ChangeConflict(f"task {tid!r} exists already")
            function = str(body.get("function", ""))
            fname = function.split(".", 1)[1] if function.startswith(plugin + ".") else function
            base = by_name.get(fname)
            if base is None:
                raise TaskDeclarationError(
                    f"plugin {plugin!r} declares no task {fname!r} whose function to call"
                )
            spec = with_trigger(
                base,
                body.get("trigger"),
                name=name,
                args=tuple(body.get("args") or ()),
                kwargs=dict(body.get("kwargs") or {}),
                depends_on=(),
            )
            self._compile_one(plugin, spec, runtime)
            return ScheduleAdded(
                task=tid,
                plugin=plugin,
                function=fname,
                trigger=dict(body.get("trigger") or {}),
                args=list(body.get("args") or ()),
                kwargs=dict(body.get("kwargs") or {}),
            )
        added = self._book.added.get(tid)
        if kind == "remove":
            if added is None:
                if tid in self._tasks:
                    raise ChangeConflict(
                        f"task {tid!r} is declared in its plugin's code: pause it, or "
                        "remove it from the plugin"
                    )
                raise LookupError(f"no task {tid!r}")
            return ScheduleRemoved(task=tid)
        # change
        if added is not None:
            base = by_name.get(added["function"])
            if base is None:
                raise TaskDeclarationError(f"the function of {tid!r} is no longer declared")
            current = with_trigger(
                base,
                added["trigger"],
                name=name,
                args=tuple(added["args"]),
                kwargs=dict(added["kwargs"]),
                depends_on=(),
            )
        elif name in by_name:
            current = by_name[name]
        else:
            raise LookupError(f"no task {tid!r}")
        extra: dict[str, Any] = {}
        if body.get("args") is not None:
            extra["args"] = tuple(body["args"])
        if body.get("kwargs") is not None:
            extra["kwargs"] = dict(body["kwargs"])
        self._compile_one(plugin, with_trigger(current, body.get("trigger"), **extra), runtime)
        return ScheduleChanged(
            task=tid,
            trigger=body.get("trigger"),
            args=body.get("args"),
            kwargs=body.get("kwargs"),
            declared=None if added is not None else declared_key(by_name[name]),
        )

    def _compile_one(self, plugin: str, spec: TaskSpec, runtime: PluginRuntime | None) -> None:
        if spec.trigger is not None and not isinstance(spec.trigger, Mapping):
            raise TaskDeclarationError("trigger: expected a mapping like {'cron': '0 * * * *'}")
        compile_spec(
            plugin,
            spec,
            runtime=runtime,
            default_tz=self.settings.default_timezone,
            grid=self._kernel().placement.shared,
        )

    async def _refuse(self, r: Recorded, reason: str) -> None:
        await self._runner.append(
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

    # -- read side (admin API) ------------------------------------------------------------

    def is_scheduled(self, task_id: str) -> bool:
        return task_id in self._tasks

    def running(self, task_id: str) -> int:
        entry = self._tasks.get(task_id)
        return entry.instances if entry is not None else 0
