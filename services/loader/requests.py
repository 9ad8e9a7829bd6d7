"""The loader's answers to request events: reload, enable, disable, install, uninstall.

The service calls these under the loader's lock for each request it receives
(``PluginReloadRequested``, ``PluginEnabled``, ``PluginDisabled``,
``PluginInstallRequested``, ``PluginUninstallRequested``). Each records its outcome
with the request as cause, so ``kernel.request(...)`` finds it; a refused request
changes nothing but the failure event.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from kernel.errors import XcoreError
from kernel.events import Recorded

from . import installer
from .deps import load_order
from .events import (
    PLUGINS_STREAM,
    PluginEnabled,
    PluginInstalled,
    PluginInstallFailed,
    PluginReloaded,
    PluginReloadFailed,
    PluginUninstalled,
    PluginUninstallFailed,
    stream_of,
)
from .generation import StageError
from .lifecycle import Lifecycle
from .manifest import ManifestError

__all__ = ["Requests"]


class Requests(Lifecycle):
    """The Loader's request handling (a base of the Loader)."""

    async def reload(self, name: str, cause: Recorded | None) -> None:
        """(Re)load ``name``: outcome PluginReloaded, PluginReloadFailed or PluginUninstalled."""
        old = self.loaded.get(name)
        serving = old.generation if old else None
        started = time.perf_counter()
        if not self.folder(name).is_dir():
            if old is None:
                await self.record(
                    PluginReloadFailed(
                        name=name,
                        stage="manifest",
                        error=f"plugin {name!r}: no folder {self.folder(name)}",
                    ),
                    cause=cause,
                )
                return
            for other in self.dependents(name):
                await self.unload(self.loaded[other], reason=f"{name} was removed", cause=cause)
            await self.unload(old, reason="its folder was removed", cause=cause)
            # forget its digest: the same folder put back must load again
            self.attempted.pop(name, None)
            await self.record(PluginUninstalled(name=name), cause=cause)
            return
        if name in self.table.disabled():
            await self.record(
                PluginReloadFailed(
                    name=name,
                    stage="disabled",
                    error=f"plugin {name!r} is disabled; enable it to load it",
                ),
                cause=cause,
            )
            return
        try:
            gen = await self.build(name, cause=cause)
        except StageError as exc:
            await self.record(
                PluginReloadFailed(
                    name=name,
                    stage=exc.stage,
                    error=exc.error,
                    traceback=exc.traceback,
                    serving_generation=serving,
                    generation=exc.generation,
                ),
                cause=cause,
            )
            return
        self.loaded[name] = gen
        if old is not None:
            await self.unload(old, reason=f"replaced by generation {gen.generation}", cause=cause)
        await self.record(
            PluginReloaded(
                name=name,
                version=gen.manifest.version,
                old_generation=serving,
                generation=gen.generation,
                duration_ms=round((time.perf_counter() - started) * 1000, 3),
            ),
            cause=cause,
        )

    def reload_targets(self) -> list[str]:
        """Every enabled plugin, dependencies before their dependents."""
        disabled = self.table.disabled()
        names = set(self.installed()) | set(self.loaded)
        # the serving generations' manifests give the order; the others follow by name
        order, _ = load_order({n: g.manifest for n, g in self.loaded.items()})
        rest = sorted(n for n in names if n not in order)
        return [n for n in [*order, *rest] if n not in disabled]

    async def reload_all(self, cause: Recorded | None) -> None:
        """Reload every enabled plugin, dependencies before their dependents."""
        for name in self.reload_targets():
            await self.reload(name, cause)

    async def disable(self, name: str, cause: Recorded | None) -> None:
        gen = self.loaded.get(name)
        if gen is None:
            return
        for other in self.dependents(name):
            await self.unload(self.loaded[other], reason=f"{name} was disabled", cause=cause)
        await self.unload(gen, reason="disabled", cause=cause)

    async def enable(self, name: str, cause: Recorded | None) -> None:
        if name in self.loaded:
            return
        await self.reload(name, cause)

    async def install(self, source: Path, replace: bool, cause: Recorded | None) -> None:
        """Stage, validate and move a plugin into place, then (re)load it."""
        try:
            staged = await asyncio.to_thread(installer.stage, source, self.plugins_dir, self.limits)
        except (installer.InstallError, ManifestError, OSError) as exc:
            await self.record(
                PluginInstallFailed(source=str(source), error=str(exc)),
                cause=cause,
                stream=PLUGINS_STREAM,
            )
            return
        name = staged.name
        try:
            self._check_install(staged, replace)
            self.attempted[name] = staged.digest
            await asyncio.to_thread(installer.commit, staged, self.plugins_dir, replace)
        except (installer.InstallError, XcoreError, OSError) as exc:
            await asyncio.to_thread(installer.discard, staged)
            await self.record(
                PluginInstallFailed(source=str(source), error=str(exc), name=name),
                cause=cause,
                stream=stream_of(name),
            )
            return
        await self.record(
            PluginInstalled(
                name=name, version=staged.manifest.version, source=str(source), digest=staged.digest
            ),
            cause=cause,
        )
        if name in self.table.disabled():
            await self.record(PluginEnabled(name=name), cause=cause)
            await self.kernel.settle()
        await self.reload(name, cause)

    def _check_install(self, staged: installer.Staged, replace: bool) -> None:
        name, prefix = staged.name, staged.manifest.prefix
        if self.folder(name).exists() and not replace:
            raise installer.InstallError(
                f"plugin {name!r} is already installed (ask for a replacement to overwrite it)"
            )
        conflict = self.prefix_conflict(name, prefix) if prefix is not None else None
        if conflict is not None:
            raise installer.InstallError(conflict)

    async def uninstall(self, name: str, cause: Recorded | None) -> None:
        folder = self.folder(name)
        dependents = self.dependents(name)
        if dependents:
            await self.record(
                PluginUninstallFailed(
                    name=name,
                    error=f"plugin {name!r} is required by loaded plugin(s) {', '.join(dependents)}",
                ),
                cause=cause,
            )
            return
        if not folder.is_dir() and name not in self.loaded:
            await self.record(
                PluginUninstallFailed(name=name, error=f"plugin {name!r} is not installed"),
                cause=cause,
            )
            return
        gen = self.loaded.get(name)
        if gen is not None:
            await self.unload(gen, reason="uninstalled", cause=cause)
        if folder.is_dir():
            try:
                await asyncio.to_thread(installer.remove_plugin, folder)
            except OSError as exc:
                await self.record(
                    PluginUninstallFailed(name=name, error=f"cannot remove {folder}: {exc}"),
                    cause=cause,
                )
                return
        self.attempted.pop(name, None)
        await self.record(PluginUninstalled(name=name), cause=cause)
