"""Validating task declarations: a :class:`~kernel.sdk.TaskSpec` becomes a :class:`CompiledTask`.

Everything that can be checked on one declaration is checked here (one trigger, a valid
cron expression, a known time zone, durations, limits); what needs the whole task set
(unknown dependencies, cycles) is checked by :func:`check_dependencies`. Each refusal is
a :class:`TaskDeclarationError` whose message names the reason; the caller adds the
plugin and the task. :func:`compile_plugin` does all of it for one plugin's tasks.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
import time
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

import pydantic_core

from kernel.runtime import PluginRuntime
from kernel.sdk import TaskSpec
from kernel.subscriptions import RetryPolicy
from services.scheduler.triggers import (
    AfterTrigger,
    AllOf,
    AnyOf,
    Bounded,
    DateTrigger,
    IntervalTrigger,
    Trigger,
    on_grid,
    parse_at,
    parse_duration,
    parse_trigger,
    parse_zone,
    transitions,
)

__all__ = [
    "MIN_DURATION",
    "CompiledTask",
    "TaskDeclarationError",
    "check_dependencies",
    "compile_plugin",
    "compile_spec",
]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")

#: The shortest interval, retry delay and timeout accepted (shorter ones are refused:
#: the scheduler's own bookkeeping per run is of that order).
MIN_DURATION = 0.01


class TaskDeclarationError(ValueError):
    """A task declaration the scheduler refuses; the message says why."""


@dataclass(eq=False)
class CompiledTask:
    """A validated task, ready to be scheduled."""

    id: str
    plugin: str
    name: str
    fn: Callable[..., Any]
    is_async: bool
    #: None for a task that runs only after its dependencies.
    trigger: Trigger | None
    jitter: float
    priority: int
    depends_on: tuple[str, ...]
    depends_rule: str
    retries: int
    retry_delay: float
    retry_max_delay: float
    timeout: float | None
    max_instances: int
    misfire: str
    misfire_grace: float
    generation: int = 0
    runtime: PluginRuntime | None = None
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: Which of several missed due times run: ``earliest``, ``latest`` or ``all``.
    coalesce: str = "latest"
    #: Seconds a run's return value is kept with its outcome (None: the setting).
    keep_result: float | None = None
    #: ``declared`` (plugin code) or ``runtime`` (added through the admin API).
    source: str = "declared"
    #: The plugin's task whose function a runtime schedule calls (None: its own).
    function: str | None = None

    @property
    def trigger_description(self) -> str:
        if self.trigger is not None:
            return self.trigger.description
        return f"after {', '.join(self.depends_on)} ({self.depends_rule})"

    def retry_backoff(self, attempt: int) -> float:
        """Delay before the attempt following failed ``attempt`` (1-based)."""
        if attempt > 1000:  # 2**1024 does not fit a float: the cap holds long before
            return self.retry_max_delay
        return RetryPolicy(first_delay=self.retry_delay, max_delay=self.retry_max_delay).delay(
            attempt
        )


def qualify(plugin: str, name: str) -> str:
    """``cleanup`` in plugin ``hello`` is ``hello.cleanup``; ``other.x`` stays as is."""
    return name if "." in name else f"{plugin}.{name}"


def compile_spec(
    plugin: str,
    spec: TaskSpec,
    *,
    generation: int = 0,
    runtime: PluginRuntime | None = None,
    default_tz: str = "UTC",
    grid: bool = False,
) -> CompiledTask:
    """Validate ``spec``; raises :class:`TaskDeclarationError` naming the reason.

    ``grid``: a cluster's task, whose intervals without a start run on the shared grid
    (:func:`~services.scheduler.triggers.on_grid`; an ``any`` or ``all`` is put there on
    one node too, see :func:`_combines`); the trigger is put there before it
    is checked, so the checks (it fires, its jitter stays below its gaps) are about the
    due times it will have."""
    try:
        return _compile(plugin, spec, generation, runtime, default_tz, grid)
    except TaskDeclarationError:
        raise
    except (ValueError, TypeError, ArithmeticError) as exc:
        raise TaskDeclarationError(str(exc)) from None
    except RecursionError:
        raise TaskDeclarationError("the trigger is nested too deeply") from None


def _compile(
    plugin: str,
    spec: TaskSpec,
    generation: int,
    runtime: PluginRuntime | None,
    default_tz: str,
    grid: bool,
) -> CompiledTask:
    if not isinstance(spec.name, str) or not _NAME.match(spec.name):
        raise TaskDeclarationError(
            f"invalid task name {spec.name!r} (letters, digits, '_' and '-'; no dots)"
        )
    if not callable(spec.fn):
        raise TaskDeclarationError(f"the task function {spec.fn!r} is not callable")
    if spec.extra:
        raise TaskDeclarationError(f"unknown option(s): {', '.join(sorted(spec.extra))}")
    chosen = {
        k: v
        for k, v in (
            ("cron", spec.cron),
            ("every", spec.every),
            ("at", spec.at),
            ("after", spec.after),
            ("trigger", spec.trigger),
        )
        if v is not None
    }
    if len(chosen) > 1:
        raise TaskDeclarationError(f"give one trigger, not {len(chosen)} ({', '.join(chosen)})")
    tz = spec.tz or default_tz
    if spec.tz is not None:
        parse_zone(spec.tz)
    trigger: Trigger | None
    bounds = {k: v for k, v in (("start", spec.start), ("end", spec.end)) if v is not None}
    if spec.trigger is not None:
        raw = spec.trigger
        trigger = parse_trigger({**raw, **bounds} if isinstance(raw, Mapping) else raw, tz)
        if bounds and not isinstance(raw, Mapping):
            raise TaskDeclarationError("start=/end= go inside a trigger given as a mapping")
    elif spec.cron is not None:
        if not isinstance(spec.cron, str):
            raise TaskDeclarationError(f"cron must be a string, got {spec.cron!r}")
        trigger = parse_trigger({"cron": spec.cron, **bounds}, tz)
    elif spec.every is not None:
        trigger = parse_trigger({"every": spec.every, **bounds}, tz)
    elif spec.at is not None:
        if bounds:
            raise TaskDeclarationError("start=/end= apply to recurring triggers, not at=")
        trigger = DateTrigger(parse_at(spec.at, tz))
    elif spec.after is not None:
        if bounds:
            raise TaskDeclarationError("start=/end= apply to recurring triggers, not after=")
        trigger = AfterTrigger(parse_duration(spec.after, "after"))
    elif spec.depends_on:
        if bounds:
            raise TaskDeclarationError("start=/end= need a trigger")
        trigger = None
    else:
        raise TaskDeclarationError(
            "no trigger: give one of cron=, every=, at=, after=, trigger= (or depends_on= alone)"
        )
    if trigger is not None and (grid or _combines(trigger)):
        trigger = on_grid(trigger)
    if trigger is not None:
        _check_trigger(trigger)
    jitter = parse_duration(spec.jitter, "jitter") if spec.jitter is not None else 0.0
    if jitter:
        _check_jitter(trigger, jitter)
    if spec.depends_rule not in ("success", "finished"):
        raise TaskDeclarationError(
            f"depends_rule must be 'success' or 'finished', got {spec.depends_rule!r}"
        )
    if spec.misfire not in ("run_once", "skip"):
        raise TaskDeclarationError(f"misfire must be 'run_once' or 'skip', got {spec.misfire!r}")
    if not isinstance(spec.priority, int) or isinstance(spec.priority, bool):
        raise TaskDeclarationError(f"priority must be an integer, got {spec.priority!r}")
    if not isinstance(spec.retries, int) or isinstance(spec.retries, bool) or spec.retries < 0:
        raise TaskDeclarationError(f"retries must be a non-negative integer, got {spec.retries!r}")
    if (
        not isinstance(spec.max_instances, int)
        or isinstance(spec.max_instances, bool)
        or spec.max_instances < 1
    ):
        raise TaskDeclarationError(
            f"max_instances must be an integer >= 1, got {spec.max_instances!r}"
        )
    timeout = parse_duration(spec.timeout, "timeout") if spec.timeout is not None else None
    if timeout is not None:
        _at_least(timeout, "timeout")
    retry_delay = parse_duration(spec.retry_delay, "retry_delay")
    retry_max_delay = parse_duration(spec.retry_max_delay, "retry_max_delay")
    if spec.retries:
        _at_least(retry_delay, "retry_delay")
        if retry_max_delay < retry_delay:
            raise TaskDeclarationError(
                f"retry_max_delay ({retry_max_delay:g}s) is below retry_delay ({retry_delay:g}s)"
            )
    coalesce = spec.coalesce or "latest"
    if coalesce not in ("earliest", "latest", "all"):
        raise TaskDeclarationError(
            f"coalesce must be 'earliest', 'latest' or 'all', got {spec.coalesce!r}"
        )
    if not isinstance(spec.args, tuple | list):
        raise TaskDeclarationError(f"args must be a list, got {spec.args!r}")
    if not isinstance(spec.kwargs, Mapping) or not all(isinstance(k, str) for k in spec.kwargs):
        raise TaskDeclarationError(f"kwargs must be a mapping of names, got {spec.kwargs!r}")
    _check_signature(spec.fn, tuple(spec.args), dict(spec.kwargs))
    keep = parse_duration(spec.keep_result, "keep_result") if spec.keep_result is not None else None
    depends = tuple(qualify(plugin, d) for d in spec.depends_on)
    task_id = f"{plugin}.{spec.name}"
    if task_id in depends:
        raise TaskDeclarationError("a task cannot depend on itself")
    fn = spec.fn
    return CompiledTask(
        id=task_id,
        plugin=plugin,
        name=spec.name,
        fn=fn,
        is_async=inspect.iscoroutinefunction(fn),
        trigger=trigger,
        jitter=jitter,
        priority=spec.priority,
        depends_on=depends,
        depends_rule=spec.depends_rule,
        retries=spec.retries,
        retry_delay=retry_delay,
        retry_max_delay=retry_max_delay,
        timeout=timeout,
        max_instances=spec.max_instances,
        misfire=spec.misfire,
        misfire_grace=parse_duration(spec.misfire_grace, "misfire_grace"),
        generation=generation,
        runtime=runtime,
        args=tuple(spec.args),
        kwargs=dict(spec.kwargs),
        coalesce=coalesce,
        keep_result=keep,
    )


def _at_least(seconds: float, what: str) -> None:
    if seconds < MIN_DURATION:
        raise TaskDeclarationError(
            f"{what}: {seconds:g}s is below the minimum of {MIN_DURATION:g}s"
        )


#: At most this many triggers combined in one (``any``/``all``, nested ones counted):
#: every due time asks each of them for its next one, on the event loop.
MAX_PARTS = 64


def _count_parts(trigger: Trigger) -> int:
    inner = trigger.inner if isinstance(trigger, Bounded) else trigger
    parts = getattr(inner, "parts", ())
    return sum(_count_parts(p) for p in parts) if parts else 1


def _check_trigger(trigger: Trigger) -> None:
    """Refuse intervals below the minimum and triggers that can never fire."""
    parts = _count_parts(trigger)
    if parts > MAX_PARTS:
        raise TaskDeclarationError(
            f"the trigger combines {parts} triggers: at most {MAX_PARTS} (each due time "
            "asks every one of them)"
        )
    inner = trigger.inner if isinstance(trigger, Bounded) else trigger
    if isinstance(inner, IntervalTrigger):
        _at_least(inner.every, "every")
    for part in getattr(inner, "parts", ()):
        _check_trigger(part)
    if not trigger.recurring:
        return
    now = time.time()
    if trigger.first(now) is None:
        if isinstance(trigger, Bounded) and trigger.end is not None and trigger.end < now:
            return  # it has fired all it will: scheduled with no next run
        raise TaskDeclarationError(
            f"{trigger.description} never fires (no due time from now on; checked "
            "by computing the first one)"
        )


def _combines(trigger: Trigger) -> bool:
    """Whether ``trigger`` is an ``any`` or an ``all`` (bounded or not): its intervals
    without a start run on the grid on one node too. A due time carries one phase, so
    parts counted from the registration could not be followed together: an ``any`` of
    10 s and 15 s ran every 10 s only, and an ``all`` of intervals never fired."""
    inner = trigger.inner if isinstance(trigger, Bounded) else trigger
    return isinstance(inner, AnyOf | AllOf)


def _check_jitter(trigger: Trigger | None, jitter: float) -> None:
    """Jitter must stay below the shortest gap between due times, or a delayed run
    would overtake the next one (false misfires and skips)."""
    if trigger is None or not trigger.recurring:
        raise TaskDeclarationError("jitter applies to recurring triggers only")
    inner = trigger.inner if isinstance(trigger, Bounded) else trigger
    if isinstance(inner, IntervalTrigger):
        gap = inner.every
    else:
        gap = math.inf
        now = time.time()
        t = trigger.first(now)
        for _ in range(10):
            n = trigger.next_after(t) if t is not None else None
            if t is None or n is None:
                break
            gap, t = min(gap, n - t), n
        # Daylight-saving changes shorten some gaps (a daily run is 23 h from the last
        # one on the day the clocks go forward): look at the due times around each
        # change of the zones involved in the next two years too.
        if math.isfinite(gap):
            for zone in _zones(trigger):
                for change, _, _ in transitions(zone, now, 2):
                    t = trigger.next_after(change - 3 * gap)
                    for _ in range(12):
                        n = trigger.next_after(t) if t is not None else None
                        if t is None or n is None or t > change + 3 * gap:
                            break
                        gap, t = min(gap, n - t), n
    if jitter >= gap:
        raise TaskDeclarationError(
            f"jitter ({jitter:g}s) must be below the interval between runs ({gap:g}s)"
        )


def _zones(trigger: Trigger) -> set[ZoneInfo]:
    """The time zones a trigger's wall-clock parts (cron, calendar) are in."""
    inner = trigger.inner if isinstance(trigger, Bounded) else trigger
    zone = getattr(inner, "zone", None)
    found = {zone} if isinstance(zone, ZoneInfo) else set()
    for part in getattr(inner, "parts", ()):
        found |= _zones(part)
    return found


#: The attribute a task function keeps its checked signature in (10,000 schedules of
#: a few functions: one ``inspect.signature`` each). On the function itself, not in a
#: module-level cache: a cache would keep every reloaded generation's functions — and
#: through their globals the whole generation — alive.
_SIGNATURE_ATTR = "__xcore_signature__"


def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    cached = getattr(fn, "__dict__", {}).get(_SIGNATURE_ATTR, _SIGNATURE_ATTR)
    if cached is not _SIGNATURE_ATTR:
        return cached  # type: ignore[no-any-return]
    try:
        signature: inspect.Signature | None = inspect.signature(fn)
    except (TypeError, ValueError):
        signature = None  # a builtin without a signature: the call will tell
    if isinstance(fn, types.FunctionType):  # (a method's or partial's: looked up each time)
        setattr(fn, _SIGNATURE_ATTR, signature)
    return signature


def _check_signature(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    signature = _signature(fn)
    if signature is None:
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise TaskDeclarationError(f"args/kwargs do not fit the function: {exc}") from None
    if not args and not kwargs:
        return
    try:
        # recorded in the log (runtime schedules): what its encoder takes (no NaN, a
        # nesting below ~250 levels, with a margin for the event's own)
        pydantic_core.to_json([[[json.loads(json.dumps([list(args), kwargs], allow_nan=False))]]])
    except (TypeError, ValueError, RecursionError):
        raise TaskDeclarationError(
            "args/kwargs must be JSON-serializable (they are recorded in the log)"
        ) from None


def expand_schedules(spec: TaskSpec) -> list[TaskSpec]:
    """``schedules=[...]``: one declaration per schedule (each item overrides options)."""
    if not spec.schedules:
        return [spec]
    names = {f.name for f in dataclasses.fields(TaskSpec)} - {"fn", "schedules", "extra"}
    out = []
    triggers = ("cron", "every", "at", "after", "trigger")
    for i, item in enumerate(spec.schedules):
        if not isinstance(item, Mapping):
            raise TaskDeclarationError(f"schedules[{i}]: expected a mapping, got {item!r}")
        unknown = set(item) - names
        if unknown:
            raise TaskDeclarationError(
                f"schedules[{i}]: unknown option(s) {', '.join(sorted(unknown))}"
            )
        changes: dict[str, Any] = dict(item)
        if any(k in item for k in triggers):
            changes.update({k: item.get(k) for k in triggers})
        changes["name"] = item.get("name") or f"{spec.name}-{i + 1}"
        if isinstance(changes.get("depends_on"), str):
            changes["depends_on"] = (changes["depends_on"],)
        for key in ("args", "depends_on"):
            if isinstance(changes.get(key), list):
                changes[key] = tuple(changes[key])
        out.append(dataclasses.replace(spec, schedules=(), **changes))
    return out


def check_dependencies(
    new: Mapping[str, CompiledTask],
    existing: Mapping[str, tuple[str, ...]],
    known: Iterable[str],
    refused_before: Iterable[str] = (),
) -> dict[str, str]:
    """Refusals (task id -> reason) for unknown dependencies and cycles.

    ``new`` are the tasks being registered, ``existing`` the dependencies of the tasks
    already registered (other plugins), ``known`` every task id the log knows of.
    A task depending on a refused task is refused too.
    """
    before = set(refused_before)
    known_ids = set(known) | set(new) | set(existing) | before
    refused: dict[str, str] = {}
    for tid, task in new.items():
        unknown = [d for d in task.depends_on if d not in known_ids]
        if unknown:
            refused[tid] = f"depends on unknown task(s) {', '.join(unknown)}"
    graph: dict[str, tuple[str, ...]] = dict(existing)
    graph.update({tid: t.depends_on for tid, t in new.items()})
    # A new cycle goes through a new task, so only what the new tasks reach is searched
    # (the tasks already registered were checked when they came).
    for cycle in _cycles(graph, roots=[t for t, task in new.items() if task.depends_on]):
        path = " -> ".join([*cycle, cycle[0]])
        for tid in cycle:
            if tid in new and tid not in refused:
                refused[tid] = f"dependency cycle: {path}"
    changed = True
    while changed:
        changed = False
        for tid, task in new.items():
            if tid in refused:
                continue
            bad = [d for d in task.depends_on if d in refused or d in before]
            if bad:
                refused[tid] = f"depends on refused task(s) {', '.join(bad)}"
                changed = True
    return refused


def compile_plugin(
    plugin: str,
    specs: Iterable[TaskSpec],
    *,
    generation: int,
    runtime: PluginRuntime | None,
    default_tz: str,
    existing: Mapping[str, tuple[str, ...]],
    known: Iterable[str],
    strict: bool,
    grid: bool = False,
) -> tuple[dict[str, CompiledTask], dict[str, str]]:
    """Compile one plugin's declarations: (accepted by task id, refused task id -> reason).

    ``existing`` and ``known`` are as for :func:`check_dependencies`. With ``strict``,
    one refusal refuses every task of the plugin, naming the first refusal. ``grid``:
    as for :func:`compile_spec`.
    """
    compiled: dict[str, CompiledTask] = {}
    refused: dict[str, str] = {}
    expanded: list[TaskSpec] = []
    for spec in specs:
        try:
            expanded.extend(expand_schedules(spec))
        except TaskDeclarationError as exc:
            refused[f"{plugin}.{getattr(spec, 'name', '?')}"] = str(exc)
    seen: dict[str, int] = {}
    for spec in expanded:
        name = getattr(spec, "name", "?")
        seen[name] = seen.get(name, 0) + 1
    for spec in expanded:
        tid = f"{plugin}.{getattr(spec, 'name', '?')}"
        if seen.get(getattr(spec, "name", "?"), 0) > 1:
            refused[tid] = (
                f"declared {seen[spec.name]} times: task names must be unique in a plugin "
                "(give each schedule its own name=)"
            )
            continue
        try:
            task = compile_spec(
                plugin,
                spec,
                generation=generation,
                runtime=runtime,
                default_tz=default_tz,
                grid=grid,
            )
        except TaskDeclarationError as exc:
            refused[tid] = str(exc)
            continue
        compiled[tid] = task
    candidates = {t: c for t, c in compiled.items() if t not in refused}
    refused.update(check_dependencies(candidates, existing, known, refused_before=refused))
    if strict and refused:
        first = next(iter(refused.items()))
        for tid in compiled:
            refused.setdefault(
                tid,
                f"not scheduled: strict plugin, and task {first[0]} was refused ({first[1]})",
            )
    accepted = {t: c for t, c in compiled.items() if t not in refused}
    return accepted, refused


def _cycles(graph: Mapping[str, tuple[str, ...]], roots: Iterable[str]) -> list[list[str]]:
    """Each strongly connected component with a cycle reachable from ``roots`` (Tarjan,
    iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in roots:
        if root in index:
            continue
        work: list[tuple[str, int]] = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            deps = graph.get(node, ())
            if i < len(deps):
                work.append((node, i + 1))
                nxt = deps[i]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return found
