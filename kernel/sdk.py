"""The plugin author's SDK: everything a plugin imports from xcore, and nothing else.

A plugin is a folder with ``run.py`` (``PLUGIN_INFO`` and optionally hooks and tasks),
``router.py`` (``router = APIRouter(...)``) and ``config.yaml``::

    # plugins/hello/run.py
    from kernel.sdk import PluginContext, task

    PLUGIN_INFO = {"version": "1.0.0", "author": "Ada", "Api_prefix": "/app/hello",
                   "tag_for_identified": ["hello"]}

    async def on_load(ctx: PluginContext) -> None:       # optional, def or async def
        ctx.logger.info("hello is up with %s", ctx.config)

    def on_unload(ctx: PluginContext) -> None:           # optional
        ...

    @task(every="30s")
    async def heartbeat() -> None:
        ctx = current_task()                             # run id, attempt, config, logger
        ctx.logger.info("beat")

This module only *declares*: the loader and the scheduler implement what it describes.
Sync hooks and tasks never run on the event loop (a worker thread for trusted plugins,
the sandbox process for sandboxed ones).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection
from contextvars import ContextVar
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, overload

if TYPE_CHECKING:
    from kernel.events import Event, Recorded

__all__ = [
    "Hook",
    "PluginContext",
    "TaskContext",
    "TaskSpec",
    "current_plugin",
    "current_task",
    "plugin_context_var",
    "task",
    "task_context_var",
]


class PluginContext(Protocol):
    """What a plugin gets from the kernel (passed to hooks; ``current_plugin()`` elsewhere)."""

    #: The plugin's name.
    name: str
    #: Its validated configuration: an instance of its config model, or the dict from
    #: ``config.yaml`` when it declares none.
    config: Any
    #: A logger named ``xcore.plugin.<name>``.
    logger: logging.Logger
    #: A folder the plugin may write to (kept across reloads).
    data_dir: Path

    async def append(self, event: Event, *, stream: str | None = None) -> list[Recorded]:
        """Record ``event`` (default stream ``plugin-<name>``); returns once durable."""
        ...

    async def subscribe(
        self,
        handler: Callable[[Recorded], Awaitable[None] | None],
        *,
        types: Collection[type[Event] | str] | None = None,
    ) -> None:
        """Receive new events live; the subscription ends when the plugin unloads."""
        ...


#: ``on_load(ctx)`` / ``on_unload(ctx)`` in ``run.py``: def or async def.
Hook = Callable[[PluginContext], Awaitable[None] | None]


@dataclass(frozen=True)
class TaskContext:
    """What a running task may ask for with :func:`current_task`."""

    task_id: str
    run_id: str
    scheduled_for: datetime
    attempt: int
    plugin: str
    config: Any
    logger: logging.LoggerAdapter[logging.Logger]


@dataclass(frozen=True)
class TaskSpec:
    """A task as declared with :func:`task` (validated by the scheduler at load)."""

    fn: Callable[..., Any]
    name: str
    cron: str | None = None
    tz: str | None = None
    every: str | float | None = None
    jitter: str | float | None = None
    at: str | datetime | None = None
    after: str | float | None = None
    priority: int = 0
    depends_on: tuple[str, ...] = ()
    depends_rule: Literal["success", "finished"] = "success"
    retries: int = 0
    retry_delay: str | float = "1s"
    retry_max_delay: str | float = "5m"
    timeout: str | float | None = None
    max_instances: int = 1
    misfire: Literal["run_once", "skip"] = "run_once"
    misfire_grace: str | float = "1m"
    #: Positional and keyword arguments the function is called with.
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: A trigger in its dict form (``{"calendar": {...}}``, ``{"any": [...]}``...) or object.
    trigger: Any = None
    #: Bounds of a recurring trigger (ISO 8601 or datetime; naive means ``tz``).
    start: str | datetime | None = None
    end: str | datetime | None = None
    #: Missed runs after downtime: ``earliest``, ``latest`` or ``all`` (default: from
    #: ``misfire``: ``run_once`` is ``latest``).
    coalesce: Literal["earliest", "latest", "all"] | None = None
    #: Several schedules of one function: each a mapping of options (``name`` gives
    #: its id, default ``<name>-<n>``) overriding this declaration's.
    schedules: tuple[dict[str, Any], ...] = ()
    #: How long the return value is kept with the outcome event (None: the setting).
    keep_result: str | float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


F = TypeVar("F", bound=Callable[..., Any])


@overload
def task(fn: F, /) -> F: ...
@overload
def task(
    *,
    name: str | None = None,
    cron: str | None = None,
    tz: str | None = None,
    every: str | float | None = None,
    jitter: str | float | None = None,
    at: str | datetime | None = None,
    after: str | float | None = None,
    priority: int = 0,
    depends_on: str | Collection[str] = (),
    depends_rule: Literal["success", "finished"] = "success",
    retries: int = 0,
    retry_delay: str | float = "1s",
    retry_max_delay: str | float = "5m",
    timeout: str | float | None = None,
    max_instances: int = 1,
    misfire: Literal["run_once", "skip"] = "run_once",
    misfire_grace: str | float = "1m",
    args: Collection[Any] = (),
    kwargs: dict[str, Any] | None = None,
    trigger: Any = None,
    start: str | datetime | None = None,
    end: str | datetime | None = None,
    coalesce: Literal["earliest", "latest", "all"] | None = None,
    schedules: Collection[dict[str, Any]] = (),
    keep_result: str | float | None = None,
) -> Callable[[F], F]: ...
def task(fn: Any = None, /, **options: Any) -> Any:
    """Declare a scheduled task (one trigger: ``cron``, ``every``, ``at`` or ``after``).

    Durations are seconds or strings like ``"30s"``, ``"10m"``, ``"1h30m"``. Nothing is
    checked here — a bad declaration must not break the plugin's import; the scheduler
    refuses it at load with the plugin, the task and the reason named.

    Stacked ``@task`` decorators give one function several schedules: each is a task of
    its own, named ``name=`` or, without it, ``<function>`` for the lowest decorator and
    ``<function>-2``, ``<function>-3``... upwards.
    """

    def mark(f: F) -> F:
        opts = dict(options)
        depends = opts.pop("depends_on", ())
        if isinstance(depends, str):
            depends = (depends,)
        stacked: list[TaskSpec] = list(getattr(f, "__xcore_tasks__", ()))
        name = opts.pop("name", None) or (
            f"{f.__name__}-{len(stacked) + 1}" if stacked else f.__name__
        )
        # An unknown option (a typo) must not break the import: it is kept aside and the
        # scheduler refuses the task, naming the option.
        unknown = {k: opts.pop(k) for k in list(opts) if k not in _TASK_OPTIONS}
        for key, kind in (("args", tuple), ("schedules", tuple)):
            if key in opts and isinstance(opts[key], list | tuple):
                opts[key] = kind(opts[key])
        if opts.get("kwargs") is None:
            opts.pop("kwargs", None)
        spec = TaskSpec(fn=f, name=name, depends_on=tuple(depends), extra=unknown, **opts)
        f.__xcore_task__ = spec  # type: ignore[attr-defined]
        f.__xcore_tasks__ = [*stacked, spec]  # type: ignore[attr-defined]
        return f

    if fn is not None:
        return mark(fn)
    return mark


_TASK_OPTIONS = {f.name for f in fields(TaskSpec)} - {"fn", "name", "depends_on", "extra"}

#: Set by the services that run plugin code (scheduler, loader), read by
#: :func:`current_task` / :func:`current_plugin`. Plugin code never sets them.
task_context_var: ContextVar[TaskContext | None] = ContextVar("xcore_task", default=None)
plugin_context_var: ContextVar[PluginContext | None] = ContextVar("xcore_plugin", default=None)
# older private names, kept for the services that used them
_current_task = task_context_var
_current_plugin = plugin_context_var


def current_task() -> TaskContext:
    """The context of the task run this code is part of."""
    ctx = _current_task.get()
    if ctx is None:
        raise RuntimeError("current_task() was called outside a scheduled task run")
    return ctx


def current_plugin() -> PluginContext:
    """The context of the plugin whose code is running (hooks, tasks, route handlers)."""
    ctx = _current_plugin.get()
    if ctx is None:
        raise RuntimeError("current_plugin() was called outside a plugin's code")
    return ctx
