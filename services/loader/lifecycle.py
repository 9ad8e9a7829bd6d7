"""The life of one plugin generation: built side by side with the one serving, mounted, unloaded.

Building a generation (:meth:`Lifecycle.build`) leaves the serving one untouched until
it succeeds:

1. manifest (read without running code), mode, prefix (reserved or claimed?),
   requirements (loaded, right version, and the plugins requiring this one still happy);
2. ``config.yaml`` parsed; the plugin's modules purged from ``sys.modules``; the package,
   ``run.py``, ``router.py`` (and ``config.py``) imported afresh in a worker thread;
3. the config validated against the plugin's ``Config`` model; ``on_load`` run;
4. the runtime published in ``kernel.plugins``, ``PluginLoaded`` recorded, and the
   router mounter's answer awaited (``RoutesMounted`` swaps atomically; ``RouteConflict``
   fails the step).

A failure raises :class:`~services.loader.generation.StageError`; before ``PluginLoaded``
it leaves no trace (the caller records the failure event), a failed mount is unloaded
(``PluginUnloaded``) first. Replacing the serving generation is the caller's step.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from kernel import pacing
from kernel.errors import RequestTimeout
from kernel.events import Recorded
from kernel.prefixes import overlaps
from kernel.runtime import PluginRuntime
from services.router.events import RouteConflict, RoutesMounted

from . import installer
from .context import LoadedContext, call_plugin
from .events import LoadStage, PluginLoaded, PluginUnloaded, stream_of
from .generation import Generation, StageError
from .hosted import build_hosted, effective_mode, host_of
from .importer import import_plugin, module_name, modules_snapshot, purge, restore
from .lazy import FieldBuildError
from .manifest import Manifest, ManifestError, read_manifest
from .priority import building, window
from .projection import PluginTable
from .settings import LoaderSettings
from .state import ACTOR, LoaderState
from .threads import PluginAborted, ThreadTimeout

if TYPE_CHECKING:
    from kernel.kernel import Kernel

__all__ = ["Lifecycle"]

log = logging.getLogger("xcore.loader")


class Lifecycle(LoaderState):
    """Builds, mounts and unloads generations (a base of the Loader)."""

    def __init__(self, kernel: Kernel, settings: LoaderSettings, table: PluginTable) -> None:
        super().__init__(kernel, settings, table)
        #: Prefixes claimed by generations being built right now.
        self._building: dict[str, str] = {}
        self._next_generation: dict[str, int] = {}
        #: The boot is loading the installed plugins (nothing is served yet: no pacing).
        self.booting = False

    def prefix_conflict(self, name: str, prefix: str) -> str | None:
        """Why ``name`` cannot claim ``prefix`` (kernel routes, another plugin), or None."""
        reserved = self.kernel.http.is_reserved(prefix)
        if reserved is not None:
            return (
                f"plugin {name!r}: run.py: key 'api_prefix': {prefix!r} collides with the "
                f"kernel's own routes ({reserved})"
            )
        claims: dict[str, str | None] = {n: g.prefix for n, g in self.loaded.items()}
        claims.update(self._building)
        for other, theirs in sorted(claims.items()):
            if other != name and theirs is not None and overlaps(prefix, theirs):
                return (
                    f"plugin {name!r}: run.py: key 'api_prefix': {prefix!r} collides with "
                    f"plugin {other!r}, mounted at {theirs!r}"
                )
        return None

    # -- building ----------------------------------------------------------------------

    def _claim(
        self, name: str, prefix: str | None, stage: LoadStage, *, router_prefix: str | None = None
    ) -> None:
        if prefix is None:
            return
        conflict = self.prefix_conflict(name, prefix)
        if conflict is not None:
            if router_prefix is not None:
                # the mount point came from APIRouter(prefix=...): name router.py, not run.py
                conflict = conflict.replace(
                    "run.py: key 'api_prefix'",
                    f"router.py: APIRouter(prefix={router_prefix!r}) gives the mount point",
                )
                raise StageError(stage, conflict, file="router.py")
            raise StageError(stage, conflict, file="run.py")
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
        self,
        name: str,
        *,
        cause: Recorded | None,
        manifest: Manifest | None = None,
        mount: bool = True,
    ) -> Generation:
        """Build, start and (unless ``mount`` is False) mount a new generation of ``name``.

        The old generation keeps serving. An unmounted generation is mounted with
        :meth:`mount` or thrown away with :meth:`discard`.
        """
        started = time.perf_counter()
        folder = self.folder(name)
        try:
            with self.priority():
                gen = await self._build(name, folder, cause, manifest, started, mount)
        finally:
            self._building.pop(name, None)
        return gen

    async def mount(self, gen: Generation, cause: Recorded | None) -> None:
        """Announce ``gen`` (``PluginLoaded``) and await the router; StageError on refusal."""
        with self.priority():
            await self._mount(gen, cause, gen.started, gen.previous)

    def mount_timeout(self) -> float:
        """``mount_timeout``, scaled while build threads are paced (the router's thread
        copying the routes computes ``build_cpu_share`` of the wall time at most)."""
        return self.settings.mount_timeout / pacing.share()

    def priority(self) -> contextlib.AbstractContextManager[None]:
        """The build window (``priority.py``): the event loop keeps priority meanwhile."""
        return building(
            self.settings.build_switch_interval_ms,
            self.settings.defer_full_gc,
            1.0 if self.booting else self.settings.build_cpu_share,
            self.settings.build_yield_ms,
            self.settings.build_fine_yield,
        )

    async def discard(self, gen: Generation, *, reason: str, cause: Recorded | None) -> None:
        """Throw a generation away and put back the modules it replaced."""
        await self.unload(gen, reason=reason, cause=cause)
        restore(gen.name, gen.previous)
        gen.previous = {}

    async def _build(
        self,
        name: str,
        folder: Path,
        cause: Recorded | None,
        manifest: Manifest | None,
        started: float,
        mount: bool = True,
    ) -> Generation:
        # Any exception at any step is this plugin's failure at the step reached, never
        # the loader's: the stage travels with it (a MemoryError, a RecursionError...).
        step: list[LoadStage] = ["manifest"]
        try:
            return await self._build_steps(name, folder, cause, manifest, started, step, mount)
        except StageError:
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if isinstance(exc, MemoryError):
                reason += " (out of memory)"
            raise StageError(step[0], f"plugin {name!r}: {reason}", exc=exc) from None

    async def _files_step(self, name: str, stage: LoadStage, fn: Any, *args: Any) -> Any:
        """Blocking reads of the plugin's files, in a thread, bounded by ``io_timeout``."""
        try:
            return await self.threads.run(
                name, f"reading files ({stage})", fn, *args, timeout=self.settings.io_timeout
            )
        except ThreadTimeout:
            raise StageError(
                stage,
                f"plugin {name!r}: reading its files did not finish within "
                f"{self.settings.io_timeout:g}s",
            ) from None

    async def _build_steps(
        self,
        name: str,
        folder: Path,
        cause: Recorded | None,
        manifest: Manifest | None,
        started: float,
        step: list[LoadStage],
        mount: bool,
    ) -> Generation:
        digest = ""
        if manifest is None:
            try:
                manifest = await self._files_step(name, "manifest", read_manifest, folder, name)
            except ManifestError as exc:
                raise StageError("manifest", str(exc), file=exc.file) from None
        step[0] = "mode"
        source = self.installing.get(name) or (self.table.rows.get(name) or {}).get("source")
        manifest = effective_mode(manifest, source, self.settings.archive_mode)
        host = host_of(self.kernel, name, manifest)
        step[0] = "manifest"
        self._claim(name, manifest.prefix, "manifest")
        step[0] = "dependency"
        self._check_requirements(name, manifest)
        step[0] = "config"
        try:
            raw_config, digest = await self._files_step(
                name, "config", _config_and_digest, folder, name
            )
        except ManifestError as exc:
            raise StageError("config", str(exc), file=exc.file) from None
        self.attempted[name] = digest
        generation = self._allocate(name)
        if host is not None:
            step[0] = "import"
            hosted = await build_hosted(
                self, host, name, folder, manifest, raw_config, digest, generation
            )
            hosted.started = started
            if mount:
                step[0] = "mount"
                await self._mount(hosted, cause, started, {})
            return hosted
        step[0] = "import"
        previous = purge(name)
        allowed = {r.name for r in manifest.requires}
        try:
            imported = await self.threads.run(
                name,
                "import",
                import_plugin,
                name,
                folder,
                manifest.prefix,
                allowed,
                self.plugins_dir,
                timeout=self.settings.import_timeout,
            )
        except ThreadTimeout:
            restore(name, previous)
            raise StageError(
                "import",
                f"plugin {name!r}: import did not finish in {self.settings.import_timeout:g} s "
                "(its thread stops at its next route declared, else runs until a restart; see /health)",
                generation=generation,
            ) from None
        except BaseException as exc:
            restore(name, previous)
            if isinstance(exc, (KeyboardInterrupt, SystemExit, asyncio.CancelledError)):
                raise
            file, line = _where(exc, folder)
            at = f"{file} line {line}: " if file else ""
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if isinstance(exc, (FieldBuildError, PluginAborted)):  # names route and field
                reason = str(exc)
            if isinstance(exc, MemoryError):
                reason += " (out of memory)"
            raise StageError(
                "import",
                f"plugin {name!r}: {at}{reason}",
                exc=exc,
                generation=generation,
                file=file,
                line=line,
            ) from None
        modules = {
            n: m
            for n, m in modules_snapshot().items()
            if n == module_name(name) or n.startswith(module_name(name) + ".")
        }
        try:
            step[0] = "mount"
            if imported.prefix != manifest.prefix:
                self._claim(name, imported.prefix, "mount", router_prefix=imported.router_prefix)
            step[0] = "config"
            config: Any = raw_config
            if imported.config_model is not None:
                try:
                    config = imported.config_model.model_validate(raw_config)
                except ValidationError as exc:
                    raise StageError(
                        "config",
                        _config_error(name, exc),
                        generation=generation,
                        file="config.yaml",
                    ) from None
            step[0] = "hook"
            ctx = LoadedContext(
                self.kernel,
                name,
                generation,
                config,
                self.data_dir / "plugins" / name,
                self.threads,
            )
            await asyncio.to_thread(ctx.data_dir.mkdir, parents=True, exist_ok=True)
            hook = imported.hooks.get("on_load")
            if hook is not None:
                try:
                    await call_plugin(
                        ctx, hook, ctx, timeout=self.settings.hook_timeout, what="on_load"
                    )
                except Exception as exc:
                    await ctx.close()
                    file, line = _where(exc, folder)
                    if isinstance(exc, TimeoutError):
                        msg = f"on_load did not finish within {self.settings.hook_timeout:g}s"
                        if not inspect.iscoroutinefunction(hook):
                            msg += " (its thread keeps running until a restart; see /health)"
                    else:
                        msg = f"on_load raised {type(exc).__name__}: {exc}"
                    raise StageError(
                        "hook",
                        f"plugin {name!r}: {file or 'run.py'}"
                        f"{f' line {line}' if line else ''}: {msg}",
                        exc=exc,
                        generation=generation,
                        file=file or "run.py",
                        line=line,
                    ) from None
        except BaseException:
            restore(name, previous)
            raise

        async def run_sync(fn: Any, *args: Any) -> Any:
            return await call_plugin(ctx, fn, *args, what=getattr(fn, "__name__", "task"))

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
            auth=manifest.auth,
        )
        gen = Generation(
            name,
            generation,
            folder,
            manifest,
            digest,
            imported,
            ctx,
            runtime,
            modules,
            previous=previous,
            started=started,
        )
        self.kernel.plugins.put(runtime)
        if mount:
            step[0] = "mount"
            await self._mount(gen, cause, started, previous)
        return gen

    # -- mounting ----------------------------------------------------------------------

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
        stream = stream_of(gen.name)
        gen.announced = True
        has_routes = gen.imported.router is not None or gen.runtime.asgi_app is not None
        if not has_routes or "router" not in self.kernel.services:
            await self.kernel.append(event, stream=stream, actor=ACTOR, cause=cause)
            return
        try:
            outcome = await self.kernel.request(
                event,
                stream=stream,
                outcomes=[RoutesMounted, RouteConflict],
                timeout=self.mount_timeout(),
                actor=ACTOR,
                cause=cause,
            )
        except RequestTimeout:
            error = f"the router did not answer within {self.mount_timeout():g}s"
        else:
            if outcome.type == RoutesMounted.type_name:
                return
            d = outcome.data
            error = (
                f"plugin {gen.name!r}: routes under {d.get('prefix')!r} conflict with "
                f"{d.get('conflicts_with')!r}: {d.get('reason', '')}"
            )
        await self.unload(gen, reason=f"mount failed: {error}", cause=cause)
        restore(gen.name, previous)
        gen.previous = {}
        file = "router.py" if gen.imported.router is not None else None
        raise StageError("mount", error, generation=gen.generation, file=file)

    async def remount(self, gen: Generation, cause: Recorded | None) -> None:
        """Offer a still-loaded generation's routes again (a newer one was rolled back)."""
        if gen.imported.router is None or "router" not in self.kernel.services:
            return
        event = PluginLoaded(
            name=gen.name,
            version=gen.manifest.version,
            generation=gen.generation,
            mode=gen.manifest.mode,
            prefix=gen.prefix,
            routes=gen.imported.routes,
            tasks=sorted(gen.imported.tasks),
            digest=gen.digest,
            duration_ms=0.0,
        )
        try:
            with self.priority():  # the router builds the app again
                outcome = await self.kernel.request(
                    event,
                    stream=stream_of(gen.name),
                    outcomes=[RoutesMounted, RouteConflict],
                    timeout=self.mount_timeout(),
                    actor=ACTOR,
                    cause=cause,
                )
        except RequestTimeout:
            log.error(
                "plugin %r: generation %d could not be mounted again", gen.name, gen.generation
            )
            return
        if outcome.type != RoutesMounted.type_name:
            log.error(
                "plugin %r: generation %d could not be mounted again: %s",
                gen.name,
                gen.generation,
                outcome.data.get("reason"),
            )

    # -- unloading ---------------------------------------------------------------------

    async def unload(self, gen: Generation, *, reason: str, cause: Recorded | None) -> None:
        """Run on_unload, end the generation's subscriptions, withdraw it, record it."""
        hook = gen.imported.hooks.get("on_unload")
        if hook is not None:
            try:
                await call_plugin(
                    gen.context,
                    hook,
                    gen.context,
                    timeout=self.settings.hook_timeout,
                    what="on_unload",
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
        release_router(gen)
        window.note_unloaded()  # garbage now: a build's window will collect it
        self.retire(gen)  # watched: still alive after a full collection is reported
        if self.loaded.get(gen.name) is gen:
            del self.loaded[gen.name]
            current = sys.modules.get(module_name(gen.name))
            if current is not None and current is gen.modules.get(module_name(gen.name)):
                purge(gen.name)
        if gen.announced:
            await self.record(
                PluginUnloaded(name=gen.name, generation=gen.generation, reason=reason),
                cause=cause,
            )


def release_router(gen: Generation) -> bool:
    """Empty the unloaded generation's own ``APIRouter`` (True if done).

    Its module's globals hold the router and the router's routes hold the module's
    functions (their globals): one reference cycle, through which every route would
    live until a full collection. The app the router service serves holds copies of the
    routes (that keep what requests in flight use), and takes them apart once its last
    request ends (services/router/dismantle.py): with this list emptied, refcounting
    frees the routes then. Only a router whose every route's endpoint was defined in
    this plugin's own modules is emptied (a router shared with another package is left
    as it is).
    """
    router = gen.imported.router
    routes = getattr(router, "routes", None)
    if not isinstance(routes, list) or not routes:
        return False
    package = module_name(gen.name)
    for route in routes:
        owner = getattr(getattr(route, "endpoint", None), "__module__", None)
        if not isinstance(owner, str) or not (owner == package or owner.startswith(package + ".")):
            return False
    routes.clear()
    return True


def _config_and_digest(folder: Path, name: str) -> tuple[dict[str, Any], str]:
    return installer.read_config(folder, name), installer.digest(folder)


def _where(exc: BaseException, folder: Path) -> tuple[str | None, int | None]:
    """(file, line) of the innermost frame in the plugin's own files, or (None, None)."""
    root = folder.resolve()
    if isinstance(exc, SyntaxError) and exc.filename:
        try:
            rel = Path(exc.filename).resolve().relative_to(root)
            return rel.as_posix(), exc.lineno
        except (ValueError, OSError):
            pass
    where: tuple[str | None, int | None] = (None, None)
    for frame in traceback.extract_tb(exc.__traceback__):
        try:
            rel = Path(frame.filename).resolve().relative_to(root)
        except (ValueError, OSError):
            continue
        where = (rel.as_posix(), frame.lineno)
    file = getattr(exc, "plugin_file", None)
    if where[0] is None and isinstance(file, str):
        return file, getattr(exc, "plugin_line", None)
    return where


def _config_error(name: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"key {key!r}: {msg}")
    return f"plugin {name!r}: config.yaml: " + "; ".join(parts)
