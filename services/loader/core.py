"""The loader's operations: build a generation, swap it in, unload, install, uninstall.

Every operation runs under one lock, records what happened, and leaves the previous
state untouched when it fails. A generation is built side by side with the one serving:

1. manifest (read without running code), mode, prefix (reserved or claimed?),
   requirements (loaded, right version, and the plugins requiring this one still happy);
2. ``config.yaml`` parsed; the plugin's modules purged from ``sys.modules``; the package,
   ``run.py``, ``router.py`` (and ``config.py``) imported afresh in a worker thread;
3. the config validated against the plugin's ``Config`` model; ``on_load`` run;
4. the runtime published in ``kernel.plugins``, ``PluginLoaded`` recorded, and the
   router mounter's answer awaited (``RoutesMounted`` swaps atomically; ``RouteConflict``
   fails the step).

Only then is the old generation unloaded. Failures before ``PluginLoaded`` leave no
trace but the failure event; a failed mount is unloaded (``PluginUnloaded``) first.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from kernel.errors import XcoreError
from kernel.events import Event, Meta, NewEvent, Recorded
from kernel.runtime import PluginRuntime
from services.router.events import RoutesMounted

from . import installer
from .context import LoadedContext, call_plugin
from .deps import load_order
from .events import (
    PLUGINS_STREAM,
    PluginDiscovered,
    PluginEnabled,
    PluginInstalled,
    PluginInstallFailed,
    PluginLoaded,
    PluginLoadFailed,
    PluginReloaded,
    PluginReloadFailed,
    PluginUninstalled,
    PluginUninstallFailed,
    PluginUnloaded,
    stream_of,
)
from .generation import Generation, StageError
from .importer import PluginImportError, import_plugin, module_name, purge, restore
from .manifest import Manifest, ManifestError, read_manifest
from .projection import PluginTable
from .settings import LoaderSettings

if TYPE_CHECKING:
    from kernel.kernel import Kernel

__all__ = ["ACTOR", "Loader", "overlaps"]

log = logging.getLogger("xcore.loader")

#: The actor of the loader's own events (its reactions to requests carry the request's ids).
ACTOR = "loader"


def overlaps(a: str, b: str) -> bool:
    """Whether two mount prefixes claim a common path (equal, or one inside the other)."""
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


class Loader:
    """The plugin loader's state and operations (one per kernel)."""

    def __init__(self, kernel: Kernel, settings: LoaderSettings, table: PluginTable) -> None:
        self.kernel = kernel
        self.settings = settings
        self.table = table
        self.plugins_dir = kernel.settings.plugins_dir.resolve()
        self.data_dir = kernel.settings.data_dir.resolve()
        self.limits = installer.Limits(
            max_bytes=int(settings.max_archive_mb * 1024 * 1024), max_files=settings.max_files
        )
        self.lock = asyncio.Lock()
        #: The serving generation of each loaded plugin.
        self.loaded: dict[str, Generation] = {}
        #: Prefixes claimed by generations being built right now.
        self._building: dict[str, str] = {}
        #: Digest of the last folder content each plugin was (re)loaded from, success or not.
        self.attempted: dict[str, str] = {}
        self._mount_waiters: dict[str, asyncio.Future[Recorded]] = {}
        self._next_generation: dict[str, int] = {}

    # -- events ------------------------------------------------------------------------

    async def record(
        self, event: Event, *, cause: Recorded | None = None, stream: str | None = None
    ) -> Recorded:
        name = getattr(event, "name", None)
        target = stream or stream_of(name if isinstance(name, str) else "unknown")
        return (await self.kernel.append(event, stream=target, actor=ACTOR, cause=cause))[0]

    def on_mount_outcome(self, record: Recorded) -> None:
        """RoutesMounted / RouteConflict: wake the load waiting for it."""
        cause = record.meta.causation_id
        future = self._mount_waiters.get(cause) if cause else None
        if future is not None and not future.done():
            future.set_result(record)

    def _router_running(self) -> bool:
        return "router" in self.kernel.services

    def folder(self, name: str) -> Path:
        return self.plugins_dir / name

    def installed(self) -> list[str]:
        """Names of the plugin folders in the plugins directory."""
        if not self.plugins_dir.is_dir():
            return []
        # a folder with neither run.py nor __init__.py is not (yet) a plugin
        return sorted(
            p.name
            for p in self.plugins_dir.iterdir()
            if p.is_dir()
            and not p.name.startswith((".", "_"))
            and ((p / "run.py").exists() or (p / "__init__.py").exists())
        )

    def dependents(self, name: str) -> list[str]:
        """Loaded plugins that require ``name``."""
        return sorted(
            g.name for g in self.loaded.values() if any(r.name == name for r in g.manifest.requires)
        )

    # -- boot --------------------------------------------------------------------------

    async def boot(self) -> None:
        """Load every installed, enabled plugin in dependency order."""
        async with self.lock:
            disabled = self.table.disabled()
            names = [n for n in self.installed() if n not in disabled]
            manifests: dict[str, Manifest] = {}
            read = await asyncio.to_thread(self._read_manifests, names)
            discovered = []
            for name in names:
                result = read[name]
                if isinstance(result, ManifestError):
                    await self.record(
                        PluginLoadFailed(name=name, stage="manifest", error=str(result))
                    )
                    continue
                manifests[name] = result
                row = self.table.rows.get(name)
                path = str(self.folder(name))
                if row is None or row["path"] != path or row["version"] != result.version:
                    discovered.append(
                        PluginDiscovered(name=name, version=result.version, path=path)
                    )
            await asyncio.gather(*(self.record(e) for e in discovered))
            order, refused = load_order(manifests)
            for name, why in sorted(refused.items()):
                await self.record(
                    PluginLoadFailed(name=name, stage="dependency", error=f"plugin {name!r} {why}")
                )
            # plugins whose requirements are all loaded can be built together
            pending = list(order)
            while pending:
                wave = [
                    n for n in pending if not any(r.name in pending for r in manifests[n].requires)
                ]
                if not wave:  # cannot happen after load_order, but never loop forever
                    wave = pending[:1]
                pending = [n for n in pending if n not in wave]
                await asyncio.gather(*(self._boot_one(n, manifests[n]) for n in wave))

    def _read_manifests(self, names: list[str]) -> dict[str, Manifest | ManifestError]:
        out: dict[str, Manifest | ManifestError] = {}
        for name in names:
            try:
                out[name] = read_manifest(self.folder(name), name)
            except ManifestError as exc:
                out[name] = exc
        return out

    async def _boot_one(self, name: str, manifest: Manifest) -> None:
        try:
            gen = await self.build(name, cause=None, manifest=manifest)
        except StageError as exc:
            await self.record(
                PluginLoadFailed(
                    name=name,
                    stage=exc.stage,
                    error=exc.error,
                    traceback=exc.traceback,
                    generation=exc.generation,
                )
            )
            return
        self.loaded[name] = gen

    # -- building a generation -------------------------------------------------------

    def _claim(self, name: str, prefix: str | None, stage: Any) -> None:
        if prefix is None:
            return
        reserved = self.kernel.http.is_reserved(prefix)
        if reserved is not None:
            raise StageError(
                stage,
                f"plugin {name!r}: run.py: key 'api_prefix': {prefix!r} collides with the "
                f"kernel's own routes ({reserved})",
            )
        claims = {n: g.prefix for n, g in self.loaded.items() if n != name}
        claims.update({n: p for n, p in self._building.items() if n != name})
        for other, theirs in sorted(claims.items()):
            if theirs is not None and overlaps(prefix, theirs):
                raise StageError(
                    stage,
                    f"plugin {name!r}: run.py: key 'api_prefix': {prefix!r} collides with "
                    f"plugin {other!r}, mounted at {theirs!r}",
                )
        self._building[name] = prefix

    def _check_requirements(self, name: str, manifest: Manifest) -> None:
        for req in manifest.requires:
            dep = self.loaded.get(req.name)
            if dep is None:
                raise StageError(
                    "dependency", f"plugin {name!r} requires {req}, which is not loaded"
                )
            if not req.allows(dep.manifest.version):
                raise StageError(
                    "dependency",
                    f"plugin {name!r} requires {req}, but {req.name} {dep.manifest.version} is loaded",
                )
        for other in self.dependents(name):
            for req in self.loaded[other].manifest.requires:
                if req.name == name and not req.allows(manifest.version):
                    raise StageError(
                        "dependency",
                        f"plugin {name!r} {manifest.version} does not satisfy plugin "
                        f"{other!r}, which requires {req}",
                    )

    def _allocate(self, name: str) -> int:
        row = self.table.rows.get(name)
        last = max(self._next_generation.get(name, 0), row["last_generation"] if row else 0)
        self._next_generation[name] = last + 1
        return last + 1

    async def build(
        self, name: str, *, cause: Recorded | None, manifest: Manifest | None = None
    ) -> Generation:
        """Build, start and mount a new generation of ``name`` (the old one keeps serving)."""
        started = time.perf_counter()
        folder = self.folder(name)
        try:
            return await self._build(name, folder, cause, manifest, started)
        finally:
            self._building.pop(name, None)

    async def _build(
        self,
        name: str,
        folder: Path,
        cause: Recorded | None,
        manifest: Manifest | None,
        started: float,
    ) -> Generation:
        digest = ""
        if manifest is None:
            try:
                manifest = await asyncio.to_thread(read_manifest, folder, name)
            except ManifestError as exc:
                raise StageError("manifest", str(exc)) from None
        if manifest.mode == "sandboxed":
            raise StageError(
                "mode",
                f"plugin {name!r}: run.py: key 'mode': 'sandboxed' plugins need the sandbox "
                "service, which is not available; the plugin was not run",
            )
        self._claim(name, manifest.prefix, "manifest")
        self._check_requirements(name, manifest)
        try:
            raw_config, digest = await asyncio.to_thread(self._config_and_digest, folder, name)
        except ManifestError as exc:
            raise StageError("config", str(exc)) from None
        self.attempted[name] = digest
        generation = self._allocate(name)
        previous = purge(name)
        try:
            imported = await asyncio.to_thread(import_plugin, name, folder, manifest.prefix)
        except BaseException as exc:
            restore(name, previous)
            if isinstance(exc, (KeyboardInterrupt, SystemExit, asyncio.CancelledError)):
                raise
            where = _culprit(exc, folder)
            raise StageError(
                "import",
                f"plugin {name!r}: {where}{type(exc).__name__}: {exc}",
                exc=exc,
                generation=generation,
            ) from None
        modules = {
            n: m
            for n, m in sys.modules.items()
            if n == module_name(name) or n.startswith(module_name(name) + ".")
        }
        try:
            if imported.prefix != manifest.prefix:
                self._claim(name, imported.prefix, "mount")
            config: Any = raw_config
            if imported.config_model is not None:
                try:
                    config = imported.config_model.model_validate(raw_config)
                except ValidationError as exc:
                    raise StageError(
                        "config", _config_error(name, exc), generation=generation
                    ) from None
            ctx = LoadedContext(
                self.kernel, name, generation, config, self.data_dir / "plugins" / name
            )
            await asyncio.to_thread(ctx.data_dir.mkdir, parents=True, exist_ok=True)
            hook = imported.hooks.get("on_load")
            if hook is not None:
                try:
                    await asyncio.wait_for(
                        call_plugin(ctx, hook, ctx), timeout=self.settings.hook_timeout
                    )
                except Exception as exc:
                    await ctx.close()
                    if isinstance(exc, TimeoutError):
                        msg = f"on_load did not finish within {self.settings.hook_timeout:g}s"
                    else:
                        msg = f"{type(exc).__name__}: {exc}"
                    raise StageError(
                        "hook",
                        f"plugin {name!r}: run.py: on_load raised {msg}",
                        exc=exc,
                        generation=generation,
                    ) from None
        except BaseException:
            restore(name, previous)
            raise

        async def run_sync(fn: Any, *args: Any) -> Any:
            return await call_plugin(ctx, fn, *args)

        runtime = PluginRuntime(
            name=name,
            generation=generation,
            version=manifest.version,
            mode=manifest.mode,
            prefix=imported.prefix,
            router=imported.router,
            tasks=dict(imported.tasks),
            context=ctx,
            module=imported.run,
            run_sync=run_sync,
        )
        gen = Generation(
            name, generation, folder, manifest, digest, imported, ctx, runtime, modules
        )
        self.kernel.plugins.put(runtime)
        await self._mount(gen, cause, started, previous)
        return gen

    async def _mount(
        self, gen: Generation, cause: Recorded | None, started: float, previous: dict[str, Any]
    ) -> None:
        event = PluginLoaded(
            name=gen.name,
            version=gen.manifest.version,
            generation=gen.generation,
            mode=gen.manifest.mode,
            prefix=gen.prefix,
            routes=gen.imported.routes,
            tasks=sorted(gen.imported.tasks),
            digest=gen.digest,
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
        )
        waits = gen.imported.router is not None and self._router_running()
        meta = Meta(
            correlation_id=(cause.meta.correlation_id or cause.meta.id) if cause else None,
            causation_id=cause.meta.id if cause else None,
            actor=ACTOR,
            node=self.kernel.node,
            boot=self.kernel.boot,
        )
        future: asyncio.Future[Recorded] = asyncio.get_running_loop().create_future()
        if waits:
            self._mount_waiters[meta.id] = future
        try:
            ne = NewEvent.of(event, meta)
            await self.kernel.append(
                NewEvent(ne.type, ne.data, meta, ne.schema), stream=stream_of(gen.name)
            )
            if not waits:
                return
            try:
                outcome = await asyncio.wait_for(future, self.settings.mount_timeout)
            except TimeoutError:
                error = f"the router did not answer within {self.settings.mount_timeout:g}s"
            else:
                if outcome.type == RoutesMounted.type_name:
                    return
                d = outcome.data
                error = (
                    f"plugin {gen.name!r}: routes under {d.get('prefix')!r} conflict with "
                    f"{d.get('conflicts_with')!r}: {d.get('reason', '')}"
                )
        finally:
            self._mount_waiters.pop(meta.id, None)
        await self.unload(gen, reason=f"mount failed: {error}", cause=cause)
        restore(gen.name, previous)
        raise StageError("mount", error, generation=gen.generation)

    def _config_and_digest(self, folder: Path, name: str) -> tuple[dict[str, Any], str]:
        return installer.read_config(folder, name), installer.digest(folder)

    # -- unloading ---------------------------------------------------------------------

    async def unload(self, gen: Generation, *, reason: str, cause: Recorded | None) -> None:
        """Run on_unload, end the generation's subscriptions, withdraw it, record it."""
        hook = gen.imported.hooks.get("on_unload")
        if hook is not None:
            try:
                await asyncio.wait_for(
                    call_plugin(gen.context, hook, gen.context), timeout=self.settings.hook_timeout
                )
            except Exception as exc:
                log.error(
                    "plugin %r generation %s: on_unload raised; unloading anyway:\n%s",
                    gen.name,
                    gen.generation,
                    "".join(traceback.format_exception(exc)),
                )
                reason = f"{reason}; on_unload raised {type(exc).__name__}: {exc}"
        await gen.context.close()
        self.kernel.plugins.remove(gen.name, gen.generation)
        if self.loaded.get(gen.name) is gen:
            del self.loaded[gen.name]
            current = sys.modules.get(module_name(gen.name))
            if current is not None and current is gen.modules.get(module_name(gen.name)):
                purge(gen.name)
        await self.record(
            PluginUnloaded(name=gen.name, generation=gen.generation, reason=reason), cause=cause
        )

    async def shutdown(self) -> None:
        """Unload everything, dependents first (the kernel is stopping)."""
        async with self.lock:
            while self.loaded:
                leaves = [n for n in self.loaded if not self.dependents(n)] or list(self.loaded)
                for name in sorted(leaves):
                    try:
                        await self.unload(self.loaded[name], reason="kernel stopping", cause=None)
                    except Exception:
                        log.exception("could not unload plugin %r at shutdown", name)
                        self.loaded.pop(name, None)

    # -- requests ----------------------------------------------------------------------

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

    async def reload_all(self, cause: Recorded | None) -> None:
        disabled = self.table.disabled()
        names = set(self.installed()) | set(self.loaded)
        manifests: dict[str, Manifest] = {}
        for name in sorted(names):
            if name in self.loaded:
                manifests[name] = self.loaded[name].manifest
        # reload dependencies before their dependents (current manifests give the order)
        order, _ = load_order(manifests)
        rest = sorted(n for n in names if n not in order)
        for name in [*order, *rest]:
            if name not in disabled:
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
        if prefix is not None:
            reserved = self.kernel.http.is_reserved(prefix)
            if reserved is not None:
                raise installer.InstallError(
                    f"plugin {name!r}: run.py: key 'api_prefix': {prefix!r} collides with the "
                    f"kernel's own routes ({reserved})"
                )
            for other, gen in self.loaded.items():
                if other != name and gen.prefix is not None and overlaps(prefix, gen.prefix):
                    raise installer.InstallError(
                        f"plugin {name!r}: run.py: key 'api_prefix': {prefix!r} collides with "
                        f"plugin {other!r}, mounted at {gen.prefix!r}"
                    )

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


def _culprit(exc: BaseException, folder: Path) -> str:
    """'router.py line 3: ' for the innermost frame of the plugin's own files."""
    if isinstance(exc, SyntaxError) and exc.filename:
        try:
            rel = Path(exc.filename).resolve().relative_to(folder.resolve())
            return f"{rel.as_posix()} line {exc.lineno}: "
        except ValueError:
            pass
    where = ""
    for frame in traceback.extract_tb(exc.__traceback__):
        try:
            rel = Path(frame.filename).resolve().relative_to(folder.resolve())
        except ValueError:
            continue
        where = f"{rel.as_posix()} line {frame.lineno}: "
    if not where and isinstance(exc, PluginImportError):
        return ""
    return where


def _config_error(name: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"key {key!r}: {msg}")
    return f"plugin {name!r}: config.yaml: " + "; ".join(parts)
