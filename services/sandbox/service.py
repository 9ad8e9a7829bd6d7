"""The sandbox service: the host of ``mode: sandboxed`` plugins.

Started before the router and the loader (``order`` 30), it registers itself in
``kernel.hosts`` under ``sandboxed``: from then on the loader hands it every sandboxed
generation instead of refusing it (:mod:`kernel.hosts`). For each generation it starts a
:class:`~services.sandbox.supervisor.SandboxedPlugin` in its own task group, and answers
the loader with a runtime whose ``asgi_app`` is a :class:`~services.sandbox.proxy.SandboxProxy`
and whose ``run_sync`` runs the plugin's tasks in the worker (with ``current_task()`` as
in the kernel). The generation's worker is stopped when the loader records
``PluginUnloaded`` for it (after a reload has mounted its successor), and every worker is
stopped when the kernel stops.

The task group lives in a task of its own, so no worker outlives the service and the
kernel's start and stop may run in different tasks. It adds ``/admin/sandbox`` and the
``sandbox`` health check; the loader's ``/admin/plugins`` rows show ``host`` (level,
limits, state, stats) through ``describe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
from contextlib import AsyncExitStack
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from kernel.events import Event, Recorded
from kernel.hosts import HostedPlugin, HostError, HostRequest
from kernel.prefixes import PrefixError, normalize_prefix, under
from kernel.runtime import PluginRuntime
from kernel.sdk import TaskSpec, task_context_var
from kernel.settings import DEFAULT_FILE

from .admin import admin_router
from .bridge import Bridge
from .cgroup import pids_base, remove_base
from .events import stream_of
from .isolation import confining_user, detect_level, environment, launch, worker_user
from .limits import MIB, LimitError, resolve
from .proxy import SandboxProxy
from .reaper import Reaper
from .settings import SandboxSettings
from .supervisor import CallFailed, SandboxedPlugin

if TYPE_CHECKING:
    from kernel.kernel import Kernel

__all__ = ["SandboxService"]

log = logging.getLogger("xcore.sandbox")

ACTOR = "sandbox"
#: Mode this service hosts.
MODE = "sandboxed"


class SandboxService:
    """Runs sandboxed plugins in supervised worker processes."""

    name = "sandbox"
    order = 30

    def __init__(self) -> None:
        self.plugins: dict[tuple[str, int], SandboxedPlugin] = {}
        self.level = "rlimits"
        self.user: tuple[int, int] | None = None
        #: Root's file access only, signals and processes as this user (see worker.py).
        self.confined: tuple[int, int] | None = None
        self._kernel: Kernel | None = None
        self._settings = SandboxSettings()
        self._tg: TaskGroup | None = None
        self._runner: asyncio.Task[None] | None = None
        self._closing: asyncio.Event | None = None
        self._reaper: Reaper | None = None
        #: Event type -> the sandboxed plugin that appends it (see Bridge.claim).
        self._event_types: dict[str, str] = {}

    @property
    def kernel(self) -> Kernel:
        if self._kernel is None:
            raise RuntimeError("the sandbox service is not started")
        return self._kernel

    async def start(self, kernel: Kernel, stack: AsyncExitStack) -> None:
        self._kernel = kernel
        self._settings = kernel.settings.section("sandbox", SandboxSettings)
        self.level = await anyio.to_thread.run_sync(detect_level, self._settings.level)
        self.user = worker_user(self._settings.user, self.level)
        self.confined = confining_user(self._settings.user, self.level, self.user)
        if self.user is None:
            # workers keep the kernel's user (a kernel that is not root, or root's file
            # access): the kernel must not be dumpable, or they could read its
            # environment (the admin token) and memory through /proc, or ptrace it
            _undumpable()
        ready = asyncio.Event()
        self._closing = asyncio.Event()
        self._runner = asyncio.create_task(self._run(ready), name="sandbox-supervisors")
        await ready.wait()
        stack.push_async_callback(self._stop)
        kernel.hosts.register(MODE, self)
        kernel.http.add_admin_router(admin_router(self))
        kernel.http.add_health_check("sandbox", self.health)
        sub = await kernel.subscribe(self._on_unloaded, types=["PluginUnloaded"], start="now")
        stack.push_async_callback(kernel.unsubscribe, sub)
        cgroups, why = await anyio.to_thread.run_sync(pids_base)
        if self.level == "rlimits":
            # bubblewrap's pid namespace ends with its worker; here a reaper process
            # kills what workers started if the kernel dies
            self._reaper = Reaper(cgroups)
            await anyio.to_thread.run_sync(self._reaper.start)
        log.info(
            "sandbox: isolation level %s, workers run as %s, processes limited by %s",
            self.level,
            f"uid {self.user[0]}" if self.user else "the kernel's user",
            f"a pids cgroup under {cgroups}" if cgroups else f"RLIMIT_NPROC ({why})",
        )
        if cgroups is None and self.user is None and self.confined is None and os.getuid() == 0:
            log.warning(
                "sandbox: workers keep root and %s: a fork bomb is held only by the "
                "supervisor's once-a-second count of their processes",
                why,
            )

    async def _run(self, ready: asyncio.Event) -> None:
        assert self._closing is not None
        async with anyio.create_task_group() as tg:
            self._tg = tg
            ready.set()
            await self._closing.wait()
            tg.cancel_scope.cancel()

    async def _stop(self) -> None:
        self.kernel.hosts.unregister(MODE, self)
        plugins = list(self.plugins.values())
        async with anyio.create_task_group() as tg:
            for plugin in plugins:
                tg.start_soon(plugin.stop, "the kernel is stopping")
        self.plugins.clear()
        assert self._closing is not None and self._runner is not None
        self._closing.set()
        await self._runner
        if self._reaper is not None:
            await anyio.to_thread.run_sync(self._reaper.close)
            self._reaper = None
        remove_base()

    # -- the host (kernel.hosts) -----------------------------------------------------

    async def load(self, request: HostRequest) -> HostedPlugin:
        settings = self._settings
        name, generation = request.name, request.generation
        try:
            limits = resolve(name, settings, request.limits, request.network)
        except LimitError as exc:
            raise HostError("manifest", str(exc)) from None
        if request.network and not limits.network:
            log.warning(
                "sandbox: plugin %r asks for network access, which services.sandbox.allow_network "
                "does not allow: it runs without network",
                name,
            )
        if self.user is not None:
            await anyio.to_thread.run_sync(_chown_tree, request.data_dir, *self.user)
        env = environment(request.data_dir, settings.env_allow)
        how = await anyio.to_thread.run_sync(
            functools.partial(
                launch,
                level=self.level,
                folder=request.folder,
                data_dir=request.data_dir,
                kernel_data_dir=self.kernel.settings.data_dir,
                network=limits.network,
                env=env,
                hidden=(Path(DEFAULT_FILE),),
                tmp_size=limits.memory,
                plugins_dir=self.kernel.settings.plugins_dir,
            )
        )
        config = {
            "name": name,
            "version": request.version,
            "folder": str(request.folder.resolve()),
            "data_dir": str(request.data_dir.resolve()),
            "prefix": request.prefix,
            "config": request.config,
            "limits": limits.as_dict(),
            "uid": self.user[0] if self.user else None,
            "gid": self.user[1] if self.user else None,
            "signal_uid": self.confined[0] if self.confined else None,
            "signal_gid": self.confined[1] if self.confined else None,
            "log_level": self.kernel.settings.log_level,
            "kernel_pid": os.getpid() if self.level == "rlimits" else None,
        }
        plugin = SandboxedPlugin(
            name=name,
            generation=generation,
            launch=how,
            config=config,
            limits=limits,
            settings=settings,
            record=self._record,
            uid=self.user[0] if self.user else os.getuid(),
            bridge=Bridge(self.kernel, name, settings.kernel_events, self._event_types),
            reaper=self._reaper,
        )
        assert self._tg is not None
        self._tg.start_soon(plugin.run)
        await plugin.started.wait()
        if plugin.ready is None:
            failure = plugin.failure or {}
            raise HostError(
                str(failure.get("stage", "import")),
                str(failure.get("error", f"plugin {name!r}: its sandbox worker failed")),
                traceback=str(failure.get("traceback", "")),
            )
        ready = plugin.ready
        try:
            ready["prefix"] = _checked_prefix(name, request.prefix, ready.get("prefix"))
            ready["openapi"] = _own_paths(ready.get("openapi"), ready["prefix"])
        except HostError:
            await plugin.stop("its worker reported a mount prefix it may not use")
            raise
        self.plugins[(name, generation)] = plugin
        tasks = {}
        for described in ready.get("tasks", []):
            tasks[described["name"]] = _task_spec(name, described)
        proxy = None
        if ready.get("routes"):
            proxy = SandboxProxy(plugin, int(settings.max_body_mb * MIB), ready.get("openapi"))

        async def run_sync(fn: Any, *args: Any) -> Any:
            return await self._run_task(plugin, fn, *args)

        runtime = PluginRuntime(
            name=name,
            generation=generation,
            version=request.version,
            mode=MODE,
            prefix=ready.get("prefix"),
            router=None,
            asgi_app=proxy,
            tasks=tasks,
            run_sync=run_sync,
        )
        runtime.extra["sandbox"] = plugin
        return HostedPlugin(runtime=runtime, routes=list(ready.get("routes", [])))

    async def stop(self, name: str, generation: int, reason: str) -> None:
        plugin = self.plugins.pop((name, generation), None)
        if plugin is not None:
            await plugin.stop(reason)

    def describe(self, name: str) -> dict[str, Any] | None:
        mine = sorted(
            (p for (n, _), p in self.plugins.items() if n == name), key=lambda p: p.generation
        )
        if not mine:
            return None
        return {"mode": MODE, **mine[-1].describe()}

    # -- tasks ------------------------------------------------------------------------

    async def _run_task(self, plugin: SandboxedPlugin, fn: Any, *args: Any) -> Any:
        task = getattr(fn, "__xcore_sandbox_task__", None)
        if task is None:
            raise RuntimeError(
                f"plugin {plugin.name!r} is sandboxed: only its own tasks run in its worker"
            )
        ctx = task_context_var.get()
        header: dict[str, Any] = {"op": "task", "task": task}
        if ctx is not None:
            header["ctx"] = {
                "task_id": ctx.task_id,
                "run_id": ctx.run_id,
                "scheduled_for": ctx.scheduled_for.isoformat(),
                "attempt": ctx.attempt,
            }
        try:
            await plugin.call(header, kind="task")
        except CallFailed as exc:
            raise SandboxTaskError(str(exc), exc.traceback) from None
        return None

    # -- events ------------------------------------------------------------------------

    async def _record(self, plugin: str, event: Event) -> None:
        try:
            await self.kernel.append(event, stream=stream_of(plugin), actor=ACTOR)
        except Exception:
            log.exception("sandbox: could not record %s for plugin %r", event.type_name, plugin)

    async def _on_unloaded(self, record: Recorded) -> None:
        if record.meta.node != self.kernel.node:
            return
        key = (record.data["name"], record.data["generation"])
        plugin = self.plugins.pop(key, None)
        if plugin is not None and self._tg is not None:
            self._tg.start_soon(plugin.stop, f"unloaded: {record.data.get('reason', '')}")

    # -- health ------------------------------------------------------------------------

    async def health(self) -> tuple[bool, dict[str, Any]]:
        states: dict[str, str] = {}
        for (name, _), plugin in sorted(self.plugins.items()):
            states[name] = plugin.state
        return True, {
            "level": self.level,
            "workers": sum(s == "running" for s in states.values()),
            "open_circuits": sorted(n for n, s in states.items() if s == "open"),
            "restarting": sorted(n for n, s in states.items() if s == "restarting"),
        }

    def all(self) -> list[dict[str, Any]]:
        return [p.describe() for _, p in sorted(self.plugins.items())]


class SandboxTaskError(Exception):
    """A sandboxed task's code raised (the message is its ``Type: message``)."""

    def __init__(self, error: str, traceback: str = "") -> None:
        super().__init__(error)
        if traceback:  # shown by traceback.format_exception (the TaskFailed traceback)
            self.add_note(f"in the sandbox worker:\n{traceback}")


def _checked_prefix(name: str, manifest: str | None, reported: Any) -> str | None:
    """The mount prefix a worker reported, checked: the plugin's code owns its worker and
    may forge the ``ready`` frame, so its routes stay under its manifest's prefix."""
    if reported is None:
        return None
    try:
        if not isinstance(reported, str):
            raise PrefixError("it is not a string")
        prefix = normalize_prefix(reported)
    except PrefixError as exc:
        raise HostError(
            "mount", f"plugin {name!r}: its worker reported the mount prefix {reported!r}: {exc}"
        ) from None
    if manifest and prefix != normalize_prefix(manifest):
        raise HostError(
            "mount",
            f"plugin {name!r}: its worker reported the mount prefix {reported!r}, not the "
            f"manifest's {manifest!r}",
        )
    return prefix


def _own_paths(openapi: Any, prefix: str | None) -> dict[str, Any] | None:
    """The worker's OpenAPI fragment without the paths outside its mount prefix (merged
    into ``/openapi.json``, they would document, or overwrite, others' routes)."""
    if not isinstance(openapi, dict) or prefix is None:
        return None
    paths = openapi.get("paths")
    if isinstance(paths, dict):
        openapi["paths"] = {
            k: v for k, v in paths.items() if isinstance(k, str) and under(k, prefix)
        }
    return openapi


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


def _task_spec(plugin: str, described: dict[str, Any]) -> TaskSpec:
    """A task as the scheduler sees it: the worker's declaration and a stand-in function
    that names the task (the scheduler hands it to ``run_sync``)."""
    name = described["name"]

    def stand_in() -> None:
        raise RuntimeError(f"task {plugin}.{name} runs in its sandbox worker only")

    stand_in.__name__ = stand_in.__qualname__ = name
    stand_in.__xcore_sandbox_task__ = name  # type: ignore[attr-defined]
    fields = {k: v for k, v in described.items() if k in TaskSpec.__dataclass_fields__}
    fields.pop("fn", None)
    if isinstance(fields.get("at"), str):
        with contextlib.suppress(ValueError):
            fields["at"] = datetime.fromisoformat(fields["at"])
    if isinstance(fields.get("depends_on"), list):
        fields["depends_on"] = tuple(fields["depends_on"])
    return TaskSpec(fn=stand_in, **fields)


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    """Give the plugin's data folder to the workers' user (a root kernel created it).

    The folder is the plugin's: a running worker (the previous generation's) may swap a
    file or a folder for a symlink while this walks it, so nothing here follows a link,
    not even in the middle of a path (folders are opened one by one, relative to their
    parent, by ``os.fwalk``): root never changes the owner of a file outside the folder.
    """
    with contextlib.suppress(OSError):
        os.chown(root, uid, gid, follow_symlinks=False)
    for _, dirs, files, fd in os.fwalk(root, follow_symlinks=False):
        for name in (*dirs, *files):
            with contextlib.suppress(OSError):
                os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)


def _undumpable() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE
        log.warning("sandbox: could not make the kernel process non-dumpable")
