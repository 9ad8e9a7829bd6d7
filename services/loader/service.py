"""The plugin loader service: boots the plugins, answers requests, watches the folder.

Started by the kernel (entry point ``loader``) after the services that react to
``PluginLoaded`` (the router mounter, the scheduler), so they see every load:

- folds :class:`~services.loader.projection.PluginTable` (the desired and actual state);
- loads every installed, enabled plugin in dependency order (:meth:`Loader.boot`);
- reacts to request events — ``PluginReloadRequested``, ``PluginEnabled``,
  ``PluginDisabled``, ``PluginInstallRequested``, ``PluginUninstallRequested`` — recorded
  by the admin API (``services/loader/api.py``), the CLI or the watcher;
- with ``settings.reload``, watches the plugins directory and records
  ``PluginReloadRequested{actor: watcher}`` for each plugin folder that changed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fnmatch
import logging
import shutil
import time
import traceback
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kernel import pacing
from kernel.collector import collector
from kernel.events import Recorded

from . import installer, lazy, source
from .api import build_router
from .core import Loader
from .events import (
    PLUGINS_STREAM,
    PluginDisabled,
    PluginEnabled,
    PluginInstallFailed,
    PluginInstallRequested,
    PluginReloadFailed,
    PluginReloadPaused,
    PluginReloadRequested,
    PluginRequestSkipped,
    PluginUninstallFailed,
    PluginUninstallRequested,
    stream_of,
)
from .files import printable
from .projection import PluginTable
from .queue import REQUESTS, acts_on
from .settings import LoaderSettings
from .watcher import watch

if TYPE_CHECKING:
    from kernel.kernel import Kernel
    from kernel.subscriptions import Subscription

__all__ = ["LoaderService"]

log = logging.getLogger("xcore.loader")

#: Seconds the plugins' unload gets at a stop even when the request in hand used the grace.
SHUTDOWN_FLOOR = 1.0

#: The window in which ``max_reloads_per_minute`` watcher reloads of one plugin are allowed.
DAMPING_WINDOW = 60.0


class LoaderService:
    """Discovery, validation, import, hot reload and installation of plugins."""

    name = "loader"
    #: After the services that react to PluginLoaded (router, scheduler: default 100).
    order = 200

    def __init__(self) -> None:
        self.loader: Loader | None = None
        #: Set once the watcher follows the plugins directory (tests wait on it).
        self.watching = asyncio.Event()
        self._stop_watch = asyncio.Event()
        self._watch_task: asyncio.Task[None] | None = None
        self._reload_times: dict[str, collections.deque[float]] = {}

    async def start(self, kernel: Kernel, stack: AsyncExitStack) -> None:
        settings = kernel.settings.section("loader", LoaderSettings)
        plugins_dir = kernel.settings.plugins_dir
        await asyncio.to_thread(plugins_dir.mkdir, parents=True, exist_ok=True)
        table = await kernel.add_projection(PluginTable())
        loader = self.loader = Loader(kernel, settings, table)
        sub = await kernel.subscribe(self._on_request, types=list(REQUESTS), start="now")
        await loader.queue.start(sub)
        stack.push_async_callback(loader.queue.stop)
        # uploads of installs a stopped server never answered (their requests say so)
        await asyncio.to_thread(shutil.rmtree, loader.data_dir / "uploads", True)
        kernel.http.add_admin_router(build_router(kernel, loader))
        # uploads may exceed the HTTP default body limit (plus room for the multipart framing)
        kernel.http.set_body_limit("/admin/plugins", loader.limits.max_bytes + 64 * 1024)
        kernel.http.add_health_check("loader", loader.health)
        if settings.defer_full_gc:
            # what exists now (kernel, services, libraries) leaves the collections for
            # good; the plugins imported next stay collectable (kernel/collector.py)
            collector.acquire()
            stack.push_async_callback(collector.release)
        # (even unpaced: a build thread the loader gave up on stops at its next route)
        pacing.install()
        # paced build threads give way while this loop has work (kernel/pacing.py)
        loop = asyncio.get_running_loop()
        if (settings.build_watch_loop or settings.build_fine_yield) and pacing.watch_loop(loop):
            stack.callback(pacing.unwatch_loop, loop)
        if not settings.parse_in_pieces:
            stack.callback(source.use_pieces, source.use_pieces(False))
        if settings.lazy_validators and lazy.install():
            stack.callback(lazy.uninstall)
        stack.push_async_callback(self._shutdown, loader, sub, kernel.settings.stop_grace)
        await loader.boot()
        if kernel.settings.reload:
            self._watch_task = asyncio.create_task(
                watch(
                    loader.plugins_dir,
                    self._on_change,
                    self._stop_watch,
                    debounce_ms=settings.debounce_ms,
                    max_debounce_ms=settings.max_debounce_ms,
                    ready=self.watching,
                ),
                name="xcore-loader-watcher",
            )
            stack.push_async_callback(self._stop_watcher)
        log.info(
            "plugins: %d loaded from %s (%s)",
            len(loader.loaded),
            loader.plugins_dir,
            ", ".join(sorted(loader.loaded)) or "none",
        )

    async def _stop_watcher(self) -> None:
        self._stop_watch.set()
        task, self._watch_task = self._watch_task, None
        if task is not None:
            try:
                await asyncio.wait_for(task, 5)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            except Exception:
                log.exception("the plugins watcher failed")

    async def _shutdown(self, loader: Loader, sub: Subscription, grace: float) -> None:
        """The loader's part of a stop, within ``grace`` seconds (``stop_grace``) in all.

        The request in hand is given up on once the grace is over (an import or hook
        stuck in its thread keeps running there, a daemon thread the exit ends; the request
        has no outcome and reads ``abandoned`` after the restart), then the plugins are
        unloaded in what is left of it (at least ``SHUTDOWN_FLOOR`` s): those whose
        ``on_unload`` did not end by then are left as they are, the process exits anyway.
        """
        deadline = time.monotonic() + grace
        await sub.stop(grace=grace)
        left = max(SHUTDOWN_FLOOR, deadline - time.monotonic())
        try:
            async with asyncio.timeout(left):
                await loader.shutdown()
        except TimeoutError:
            log.error(
                "plugins not unloaded within the stop grace (%gs): %s; stopping anyway",
                grace,
                ", ".join(sorted(loader.loaded)) or "none",
            )

    async def _on_request(self, record: Recorded) -> None:
        loader = self.loader
        assert loader is not None
        event = record.event
        if not acts_on(loader.kernel, record):
            return  # our own PluginEnabled after an install, or another node's business
        if isinstance(event, PluginReloadRequested) and record.meta.actor != "watcher":
            if event.name is not None:
                loader.paused.discard(event.name)  # a person asked: the watcher may go on
            else:
                loader.paused.clear()
        loader.queue.started(record)
        try:
            await loader.kernel.settle(record.position)
            async with loader.lock:
                loader.busy = (record.type, time.monotonic())
                try:
                    await self._act(loader, event, record)
                    if await loader.queue.outcome_of(record) is None:
                        # nothing to change: answered all the same, or a restart would
                        # read it as abandoned (never run)
                        name = getattr(event, "name", None)
                        await loader.record(
                            PluginRequestSkipped(request=record.type, name=name),
                            cause=record,
                            stream=stream_of(name) if name else PLUGINS_STREAM,
                        )
                finally:
                    loader.busy = None
        except Exception as exc:
            # Never retried, never left unanswered: the request gets its failure now.
            log.exception("the loader failed on %s (position %d)", record.type, record.position)
            await self._answer_failure(loader, event, record, exc)
        finally:
            if isinstance(event, PluginInstallRequested):
                await self._drop_upload(loader, Path(event.source))
            loader.queue.finished(record)  # last: the subscription moves past it at once

    async def _drop_upload(self, loader: Loader, source: Path) -> None:
        """An uploaded archive (admin API) is removed once its install is answered."""
        uploads = loader.data_dir / "uploads"
        if source.parent.parent != uploads:
            return  # a path given by someone else: not ours to remove
        try:
            await asyncio.to_thread(shutil.rmtree, source.parent)
        except FileNotFoundError:
            pass
        except OSError:
            log.exception("could not remove the uploaded archive %s", source)

    async def _act(self, loader: Loader, event: object, record: Recorded) -> None:
        if isinstance(event, PluginReloadRequested):
            if event.name is None:
                await loader.reload_all(record)
            else:
                await loader.reload(event.name, record)
        elif isinstance(event, PluginEnabled):
            await loader.enable(event.name, record)
        elif isinstance(event, PluginDisabled):
            await loader.disable(event.name, record)
        elif isinstance(event, PluginInstallRequested):
            await loader.install(Path(event.source), event.replace, record)
        elif isinstance(event, PluginUninstallRequested):
            await loader.uninstall(event.name, record)

    async def _answer_failure(
        self, loader: Loader, event: object, record: Recorded, exc: Exception
    ) -> None:
        error = f"the loader failed: {type(exc).__name__}: {exc}"
        tb = "".join(traceback.format_exception(exc))
        answer: Any = None
        name = getattr(event, "name", None)
        if isinstance(event, (PluginReloadRequested, PluginEnabled)) and name is not None:
            answer = PluginReloadFailed(name=name, stage="internal", error=error, traceback=tb)
        elif isinstance(event, PluginInstallRequested):
            answer = PluginInstallFailed(source=event.source, error=error, traceback=tb)
        elif isinstance(event, PluginUninstallRequested):
            answer = PluginUninstallFailed(name=event.name, error=error)
        if answer is None:
            return
        try:
            stream = stream_of(name) if isinstance(name, str) else PLUGINS_STREAM
            await loader.record(answer, cause=record, stream=stream)
        except Exception:
            log.exception("could not record the failure of %s", record.type)

    def _relevant(self, loader: Loader, name: str, files: set[str]) -> set[str]:
        """The changed files that are code or configuration (others never reload)."""
        gen = loader.loaded.get(name)
        patterns = gen.manifest.watch if gen is not None else ()
        return {
            f
            for f in files
            if not f  # the folder itself (added, removed)
            or f.endswith(".py")
            or f == "config.yaml"
            or any(fnmatch.fnmatchcase(f, p) for p in patterns)
        }

    def _damped(self, name: str, limit: int) -> int | None:
        """Count a watcher reload of ``name``; the count when it passes ``limit`` a minute."""
        now = time.monotonic()
        times = self._reload_times.setdefault(name, collections.deque())
        while times and now - times[0] > DAMPING_WINDOW:
            times.popleft()
        times.append(now)
        return len(times) if len(times) > limit else None

    async def _on_change(self, changes: dict[str, set[str]]) -> None:
        """The watcher saw changes: ask for a reload of each plugin whose code changed."""
        loader = self.loader
        assert loader is not None
        disabled = loader.table.disabled()
        for name, all_files in sorted(changes.items()):
            if name in disabled or name in loader.paused:
                continue
            files = self._relevant(loader, name, all_files)
            if not files:
                continue  # e.g. a cache or state file the plugin writes into its folder
            folder = loader.folder(name)
            if folder.is_dir():
                digest = await asyncio.to_thread(installer.digest, folder)
                if digest == loader.attempted.get(name):
                    continue  # e.g. a save without a change, or the installer's own copy
            elif name not in loader.loaded:
                continue
            count = self._damped(name, loader.settings.max_reloads_per_minute)
            if count is not None:
                loader.paused.add(name)
                reason = (
                    f"plugin {name!r} was reloaded {count} times by file changes within "
                    f"{DAMPING_WINDOW:g}s; the watcher's reloads of it are paused (write "
                    "data into context.data_dir, not the plugin folder; `xcore plugin reload "
                    f"{name}` resumes them)"
                )
                log.warning("%s", reason)
                await loader.record(
                    PluginReloadPaused(
                        name=name, reloads=count, window_s=DAMPING_WINDOW, reason=reason
                    )
                )
                continue
            what = ", ".join(sorted(printable(f) for f in files if f)) or "folder"
            await loader.kernel.append(
                PluginReloadRequested(name=name, reason=f"changed: {what}"),
                stream=stream_of(name),
                actor="watcher",
            )
