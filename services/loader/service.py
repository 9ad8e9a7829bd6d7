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
import contextlib
import logging
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from kernel.events import Recorded

from . import installer
from .api import build_router
from .core import ACTOR, Loader
from .events import (
    PluginDisabled,
    PluginEnabled,
    PluginInstallRequested,
    PluginReloadRequested,
    PluginUninstallRequested,
    stream_of,
)
from .projection import PluginTable
from .settings import LoaderSettings
from .watcher import watch

if TYPE_CHECKING:
    from kernel.kernel import Kernel

__all__ = ["LoaderService"]

log = logging.getLogger("xcore.loader")

REQUESTS = (
    PluginReloadRequested,
    PluginEnabled,
    PluginDisabled,
    PluginInstallRequested,
    PluginUninstallRequested,
)


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

    async def start(self, kernel: Kernel, stack: AsyncExitStack) -> None:
        settings = kernel.settings.section("loader", LoaderSettings)
        plugins_dir = kernel.settings.plugins_dir
        await asyncio.to_thread(plugins_dir.mkdir, parents=True, exist_ok=True)
        table = await kernel.add_projection(PluginTable())
        loader = self.loader = Loader(kernel, settings, table)
        await kernel.subscribe(self._on_request, types=list(REQUESTS), start="now")
        kernel.http.add_admin_router(build_router(kernel, loader))
        stack.push_async_callback(loader.shutdown)
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

    async def _on_request(self, record: Recorded) -> None:
        loader = self.loader
        assert loader is not None
        if record.meta.actor == ACTOR:
            return  # our own PluginEnabled (after an install), already acted upon
        event = record.event
        kernel = loader.kernel
        if (
            kernel.placement.shared
            and record.meta.node != kernel.node
            and (isinstance(event, PluginInstallRequested) or record.meta.actor == "cluster")
        ):
            # a cluster: an install reads a path local to the node that received it, and
            # the cluster service spreads its result; "cluster" requests are node-local
            return
        await loader.kernel.settle(record.position)
        async with loader.lock:
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

    async def _on_change(self, changes: dict[str, set[str]]) -> None:
        """The watcher saw changes: ask for a reload of each plugin whose content changed."""
        loader = self.loader
        assert loader is not None
        disabled = loader.table.disabled()
        for name, files in sorted(changes.items()):
            if name in disabled:
                continue
            folder = loader.folder(name)
            if folder.is_dir():
                digest = await asyncio.to_thread(installer.digest, folder)
                if digest == loader.attempted.get(name):
                    continue  # e.g. a save without a change, or the installer's own copy
            elif name not in loader.loaded:
                continue
            what = ", ".join(sorted(f for f in files if f)) or "folder"
            await loader.kernel.append(
                PluginReloadRequested(name=name, reason=f"changed: {what}"),
                stream=stream_of(name),
                actor="watcher",
            )
