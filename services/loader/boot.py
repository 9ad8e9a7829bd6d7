"""Loading every plugin at start and unloading them at stop, in dependency order.

At boot the manifests of the installed, enabled plugins are read (no plugin code runs),
new or changed folders are recorded as ``PluginDiscovered``, plugins whose requirements
cannot be met fail at the ``dependency`` stage, and the rest are built in waves: every
plugin whose requirements are all loaded is built together with the others of its wave.
At stop, dependents are unloaded before the plugins they require.
"""

from __future__ import annotations

import asyncio
import logging
import time

from .deps import load_order
from .events import PluginDiscovered, PluginLoadFailed
from .generation import StageError
from .lifecycle import Lifecycle
from .manifest import Manifest, ManifestError, read_manifest
from .threads import ThreadTimeout

__all__ = ["Boot"]

log = logging.getLogger("xcore.loader")


class Boot(Lifecycle):
    """The Loader's start and stop (a base of the Loader)."""

    async def boot(self) -> None:
        """Load every installed, enabled plugin in dependency order."""
        # nothing is served yet: builds are not paced (kernel/pacing.py)
        self.booting = True
        try:
            await self._boot()
        finally:
            self.booting = False

    async def _boot(self) -> None:
        async with self.lock:
            disabled = self.table.disabled()
            names = [n for n in self.installed() if n not in disabled]
            manifests: dict[str, Manifest] = {}
            read = await self._read_all(names)
            discovered = []
            for name in names:
                result = read[name]
                if isinstance(result, ManifestError):
                    await self.record(
                        PluginLoadFailed(
                            name=name, stage="manifest", error=str(result), file=result.file
                        )
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

    async def _read_all(self, names: list[str]) -> dict[str, Manifest | ManifestError]:
        """Every manifest, each read in a thread bounded by ``io_timeout``."""

        gate = asyncio.Semaphore(8)  # a few threads at a time, however many plugins

        async def one(name: str) -> Manifest | ManifestError:
            async with gate:
                return await read(name)

        async def read(name: str) -> Manifest | ManifestError:
            try:
                result: Manifest = await self.threads.run(
                    name,
                    "reading run.py",
                    read_manifest,
                    self.folder(name),
                    name,
                    timeout=self.settings.io_timeout,
                )
            except ManifestError as exc:
                return exc
            except ThreadTimeout:
                return ManifestError(
                    name, "run.py", f"reading did not finish within {self.settings.io_timeout:g}s"
                )
            except Exception as exc:  # never the boot's failure: this plugin's
                return ManifestError(name, "run.py", f"{type(exc).__name__}: {exc}")
            return result

        results = await asyncio.gather(*(one(n) for n in names))
        return dict(zip(names, results, strict=True))

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
                    file=exc.file,
                    line=exc.line,
                )
            )
            return
        self.loaded[name] = gen
        gen.previous = {}
        log.info(
            "plugin %r: generation %d loaded (version %s) in %.1f ms",
            name,
            gen.generation,
            gen.manifest.version,
            (time.perf_counter() - gen.started) * 1000,
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
