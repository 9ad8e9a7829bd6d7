"""The loader's shared state: the serving generations, the lock, and what they are read from.

:class:`LoaderState` is the base of :class:`~services.loader.core.Loader`: the attributes
and queries every operation of the loader (a generation's lifecycle, the boot, the
answers to requests) and the admin API read.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import types
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kernel import pacing
from kernel.collector import collector
from kernel.events import Event, Recorded

from . import installer
from .events import (
    PluginInstalled,
    PluginInstallFailed,
    PluginLoadFailed,
    PluginReloaded,
    PluginReloadFailed,
    stream_of,
)
from .files import printable
from .generation import Generation
from .projection import PluginTable
from .queue import ACTOR, RequestQueue
from .settings import LoaderSettings
from .threads import PluginThreads

if TYPE_CHECKING:
    from kernel.kernel import Kernel

__all__ = ["ACTOR", "LoaderState"]

log = logging.getLogger("xcore.loader")

#: Unloaded generations watched for leaks at most (the oldest are forgotten).
MAX_RETIRED = 1000


class LoaderState:
    """What the loader knows (one per kernel); every operation runs under :attr:`lock`."""

    def __init__(self, kernel: Kernel, settings: LoaderSettings, table: PluginTable) -> None:
        self.kernel = kernel
        self.settings = settings
        self.table = table
        self.plugins_dir = kernel.settings.plugins_dir.resolve()
        self.data_dir = kernel.settings.data_dir.resolve()
        self.limits = installer.Limits.of(settings)
        self.lock = asyncio.Lock()
        #: Where plugin code runs off the loop; remembers threads that outlived a timeout.
        self.threads = PluginThreads()
        #: The serving generation of each loaded plugin.
        self.loaded: dict[str, Generation] = {}
        #: Digest of the last folder content each plugin was (re)loaded from, success or not.
        self.attempted: dict[str, str] = {}
        #: The source of each plugin being installed right now (the projection learns
        #: it once the install is recorded, after its build): decides its mode.
        self.installing: dict[str, str] = {}
        self._warned: set[str] = set()
        #: Plugins whose watcher reloads are paused (a reload loop); an admin reload resumes.
        self.paused: set[str] = set()
        #: What the loader is doing under its lock, and since when (monotonic).
        self.busy: tuple[str, float] | None = None
        #: The requests in hand and in line (services/loader/queue.py).
        self.queue = RequestQueue(kernel, max_queued=settings.max_queued)
        #: Unloaded generations: (plugin, generation, full collections at unload, a weak
        #: reference to its run module); one still alive after a full collection is held
        #: by something (a shared module's global, a thread, a cache): it never frees.
        self.retired: list[tuple[str, int, int, list[weakref.ref[Any]]]] = []
        self._leaks_logged: set[tuple[str, int]] = set()

    async def health(self) -> tuple[bool, dict[str, Any]]:
        """``/health``'s ``loader`` check: failing while a plugin thread is stuck."""
        stuck = [s.describe() for s in self.threads.stuck]
        busy = None
        if self.busy is not None:
            busy = {"doing": self.busy[0], "for_s": round(time.monotonic() - self.busy[1], 3)}
        details: dict[str, Any] = {
            "loaded": len(self.loaded),
            "stuck_threads": stuck,
            "busy": busy,
            "reloads_paused": sorted(self.paused),
            "requests": self.queue.describe_line(),
            "gc": collector.stats(),
            "pacing": pacing.stats(),
        }
        leaked = self.leaked_generations()
        if leaked:
            details["leaked_generations"] = leaked
        draining = self.draining_generations()
        if draining:
            details["draining_generations"] = draining
        if stuck:
            details["error"] = (
                "plugin code outlived its timeout and keeps running in a thread that cannot "
                "be stopped; restart the server to end it"
            )
        return not stuck, details

    def retire(self, gen: Generation) -> None:
        """``gen`` was unloaded: watch whether its objects are freed (weakly).

        One function or class defined at the top of each of its modules stands for the
        module: anything of it kept (the module, a function, an instance of a class, the
        router) reaches its globals, so keeps that sentinel alive.
        """
        refs = []
        for module in {id(m): m for m in [gen.imported.run, *gen.modules.values()]}.values():
            for value in list(vars(module).values()):
                if (
                    isinstance(value, (type, types.FunctionType))
                    and getattr(value, "__module__", None) == module.__name__
                ):
                    refs.append(weakref.ref(value))
                    break
        full = gc.get_stats()[2]["collections"]
        self.retired.append((gen.name, gen.generation, full, refs))
        del self.retired[:-MAX_RETIRED]

    def draining_generations(self) -> dict[str, dict[str, float]]:
        """Unloaded generations of this loader's plugins still serving requests (a
        stream or a websocket opened before the reload), per plugin: generation ->
        seconds since it was withdrawn. Freed once their last request ends; a request
        that never ends keeps its generation alive until a restart."""
        now = time.monotonic()
        retired = {(r[0], r[1]) for r in self.retired}
        out: dict[str, dict[str, float]] = {}
        for (name, generation), since in sorted(collector.draining.items()):
            if (name, generation) in retired:
                out.setdefault(name, {})[str(generation)] = round(now - since, 1)
        return out

    def leaked_generations(self) -> dict[str, list[int]]:
        """Unloaded generations still alive after a full collection, per plugin (each
        logged once, naming the plugin: its memory is never given back)."""
        self.retired = [r for r in self.retired if any(ref() is not None for ref in r[3])]
        out: dict[str, list[int]] = {}
        for name, generation, at, _ in self.retired:
            if not collector.full_since((name, generation), at):
                continue  # not yet looked at by a full collection since its last request
            out.setdefault(name, []).append(generation)
            if (name, generation) not in self._leaks_logged:
                self._leaks_logged.add((name, generation))
                log.warning(
                    "plugin %r generation %d was unloaded but is still alive after a full "
                    "collection: something holds a reference to it (a global of a shared "
                    "module, a thread, a cache, an exception); its memory is never freed",
                    name,
                    generation,
                )
        return out

    async def record(
        self, event: Event, *, cause: Recorded | None = None, stream: str | None = None
    ) -> Recorded:
        """Append one of the loader's events (default stream: the plugin's)."""
        name = getattr(event, "name", None)
        target = stream or stream_of(name if isinstance(name, str) else "unknown")
        recorded = (await self.kernel.append(event, stream=target, actor=ACTOR, cause=cause))[0]
        _log_outcome(event)
        return recorded

    def folder(self, name: str) -> Path:
        return self.plugins_dir / name

    def installed(self) -> list[str]:
        """Names of the plugin folders in the plugins directory."""
        if not self.plugins_dir.is_dir():
            return []
        # a folder with neither run.py nor __init__.py is not (yet) a plugin
        names = []
        for p in self.plugins_dir.iterdir():
            if p.name.startswith((".", "_")) or not p.is_dir():
                continue
            if printable(p.name) != p.name:
                if p.name not in self._warned:
                    self._warned.add(p.name)
                    log.error(
                        "plugin folder '%s' ignored: its name is not valid UTF-8 (plugin names "
                        "are a letter then letters, digits or '_')",
                        printable(p.name),
                    )
                continue
            if (p / "run.py").exists() or (p / "__init__.py").exists():
                names.append(p.name)
        return sorted(names)

    def dependents(self, name: str) -> list[str]:
        """Loaded plugins that require ``name``, directly or through others.

        In unload order: a plugin comes before every plugin it requires.
        """
        order: list[str] = []
        seen = {name}

        def visit(target: str) -> None:
            direct = sorted(
                g.name
                for g in self.loaded.values()
                if any(r.name == target for r in g.manifest.requires)
            )
            for other in direct:
                if other not in seen:
                    seen.add(other)
                    visit(other)
                    order.append(other)

        visit(name)
        return order


def _log_outcome(event: Event) -> None:
    """Failures at ERROR, where the person running ``xcore serve`` looks; successes at INFO."""
    if isinstance(event, (PluginLoadFailed, PluginReloadFailed, PluginInstallFailed)):
        what = {
            PluginLoadFailed: "load",
            PluginReloadFailed: "reload",
            PluginInstallFailed: "install",
        }[type(event)]
        where = ""
        file = getattr(event, "file", None)
        if file:
            line = getattr(event, "line", None)
            where = f" in {file}" + (f" line {line}" if line else "")
        serving = getattr(event, "serving_generation", None)
        keeps = f"; generation {serving} keeps serving" if serving else ""
        log.error(
            "plugin %r: %s failed at stage %s%s: %s%s",
            event.name,
            what,
            event.stage or "install",
            where,
            event.error.removeprefix(f"plugin {event.name!r}: "),
            keeps,
        )
    elif isinstance(event, PluginReloaded):
        log.info(
            "plugin %r: generation %d serving (version %s, replaced %s) in %.1f ms",
            event.name,
            event.generation,
            event.version,
            event.old_generation if event.old_generation is not None else "nothing",
            event.duration_ms,
        )
    elif isinstance(event, PluginInstalled):
        log.info("plugin %r: version %s installed from %s", event.name, event.version, event.source)
