"""The loader's answers to request events: reload, enable, disable, install, uninstall.

The service calls these under the loader's lock for each request it receives
(``PluginReloadRequested``, ``PluginEnabled``, ``PluginDisabled``,
``PluginInstallRequested``, ``PluginUninstallRequested``). Each records its outcome
with the request as cause, so ``kernel.request(...)`` finds it; a refused request
changes nothing but the failure event.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Awaitable, Callable
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
from .generation import Generation, StageError
from .lifecycle import Lifecycle
from .manifest import ManifestError

__all__ = ["Requests"]

log = logging.getLogger("xcore.loader")


class Requests(Lifecycle):
    """The Loader's request handling (a base of the Loader)."""

    async def reload(self, name: str, cause: Recorded | None) -> None:
        """(Re)load ``name``: outcome PluginReloaded, PluginReloadFailed or PluginUninstalled."""
        old = self.loaded.get(name)
        serving = old.generation if old else None
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
        failure = await self.reload_group(name, cause)
        if failure is not None:
            await self.record(
                PluginReloadFailed(
                    name=name,
                    stage=failure.stage,
                    error=failure.error,
                    traceback=failure.traceback,
                    serving_generation=serving,
                    generation=failure.generation,
                    file=failure.file,
                    line=failure.line,
                ),
                cause=cause,
            )

    async def reload_group(
        self,
        name: str,
        cause: Recorded | None,
        before_commit: Callable[[], Awaitable[None]] | None = None,
    ) -> StageError | None:
        """Reload ``name`` and the loaded plugins requiring it, as one change.

        Every new generation is built first (the old ones keep serving), then all are
        mounted, then the old ones are unloaded and ``PluginReloaded`` recorded for
        each, ``name`` first. If any step fails, every new generation is thrown away,
        the old ones keep serving, and the failure is returned (not recorded).
        """
        started = time.perf_counter()
        group = [name, *reversed(self.dependents(name))] if name in self.loaded else [name]
        olds = {n: self.loaded.get(n) for n in group}
        built: list[Generation] = []
        mounted: list[Generation] = []
        try:
            for member in group:
                try:
                    gen = await self.build(member, cause=cause, mount=False)
                except StageError as exc:
                    if member != name:
                        exc.error = (
                            f"plugin {member!r} requires {name!r} and is reloaded with it, but "
                            f"failed: {exc.error}; nothing changed"
                        )
                    raise
                built.append(gen)
                # tentatively: the plugins requiring it are checked against the new version
                self.loaded[member] = gen
            for gen in built:
                await self.mount(gen, cause)
                mounted.append(gen)
            if before_commit is not None:
                await before_commit()
        except StageError as exc:
            await self._roll_back(built, mounted, olds, cause, exc)
            return exc
        except Exception as exc:
            await self._roll_back(built, mounted, olds, cause, exc)
            return StageError("internal", f"plugin {name!r}: {type(exc).__name__}: {exc}", exc=exc)
        for gen in built:
            gen.previous = {}  # committed: the old modules may go
        for member in reversed(group):
            old = olds[member]
            if old is not None:
                new_gen = self.loaded[member].generation
                await self.unload(old, reason=f"replaced by generation {new_gen}", cause=cause)
        for gen in built:
            old = olds[gen.name]
            duration = round((time.perf_counter() - started) * 1000, 3)
            await self.record(
                PluginReloaded(
                    name=gen.name,
                    version=gen.manifest.version,
                    old_generation=old.generation if old else None,
                    generation=gen.generation,
                    duration_ms=duration,
                ),
                cause=cause,
            )
        return None

    async def _roll_back(
        self,
        built: list[Generation],
        mounted: list[Generation],
        olds: dict[str, Generation | None],
        cause: Recorded | None,
        exc: BaseException,
    ) -> None:
        for gen in reversed(built):
            old = olds[gen.name]
            if old is None:
                self.loaded.pop(gen.name, None)
            else:
                self.loaded[gen.name] = old
            try:
                await self.discard(gen, reason=f"rolled back: {exc}", cause=cause)
                if gen in mounted and old is not None:
                    await self.remount(old, cause)
            except Exception:
                log.exception("rolling back generation %d of %r failed", gen.generation, gen.name)

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
        """Stage and check, commit the files, load; or roll everything back.

        The steps (kept apart so another store of archives can take the first one):
        1. stage: copy or extract into the staging area, check every member, validate;
        2. commit: swap the folders, the old one kept aside;
        3. load the new version (with the plugins requiring it); once it serves, record
           ``PluginInstalled`` and drop the old files — or, if it failed, put the old
           folder back (the old generation never stopped serving) and record
           ``PluginInstallFailed`` with the stage and reason.
        """
        try:
            staged = await asyncio.to_thread(installer.stage, source, self.plugins_dir, self.limits)
        except (installer.InstallError, ManifestError, OSError) as exc:
            await self.record(
                PluginInstallFailed(source=str(source), error=str(exc)),
                cause=cause,
                stream=PLUGINS_STREAM,
            )
            return
        except Exception as exc:
            await self.record(
                PluginInstallFailed(
                    source=str(source),
                    error=f"{source}: cannot be installed: {type(exc).__name__}: {exc}",
                    traceback="".join(traceback.format_exception(exc)),
                ),
                cause=cause,
                stream=PLUGINS_STREAM,
            )
            return
        name = staged.name
        previous_digest = self.attempted.get(name)
        try:
            self._check_install(staged, replace)
            self.attempted[name] = staged.digest
            old_folder = await asyncio.to_thread(
                installer.commit, staged, self.plugins_dir, replace
            )
        except (installer.InstallError, XcoreError, OSError) as exc:
            await asyncio.to_thread(installer.discard, staged)
            self._forget_attempt(name, previous_digest)
            await self.record(
                PluginInstallFailed(source=str(source), error=str(exc), name=name),
                cause=cause,
                stream=stream_of(name),
            )
            return
        if name in self.table.disabled():
            await self.record(PluginEnabled(name=name), cause=cause)
            await self.kernel.settle()

        async def installed() -> None:
            await self.record(
                PluginInstalled(
                    name=name,
                    version=staged.manifest.version,
                    source=str(source),
                    digest=staged.digest,
                ),
                cause=cause,
            )

        failure = await self.reload_group(name, cause, before_commit=installed)
        if failure is None:
            await asyncio.to_thread(installer.discard, staged)
            return
        try:
            await asyncio.to_thread(installer.rollback, staged, self.plugins_dir, old_folder)
            undone = "the plugins directory is as it was"
        except OSError as exc:
            log.exception("could not roll back the install of %r", name)
            undone = f"rolling the files back failed ({exc})"
        self._forget_attempt(name, previous_digest)
        kept = (
            f"; generation {self.loaded[name].generation} keeps serving"
            if name in self.loaded
            else ""
        )
        await self.record(
            PluginInstallFailed(
                source=str(source),
                name=name,
                stage=failure.stage,
                error=f"{failure.error} (install undone: {undone}{kept})",
                traceback=failure.traceback,
            ),
            cause=cause,
        )

    def _forget_attempt(self, name: str, previous: str | None) -> None:
        if previous is None:
            self.attempted.pop(name, None)
        else:
            self.attempted[name] = previous

    def _check_install(self, staged: installer.Staged, replace: bool) -> None:
        name, prefix = staged.name, staged.manifest.prefix
        if self.folder(name).exists() and not replace:
            raise installer.InstallError(
                f"plugin {name!r} is already installed (use --replace, or replace=true, to "
                "overwrite it)"
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
