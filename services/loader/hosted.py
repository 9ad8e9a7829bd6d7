"""Generations the loader does not run itself: plugins of a mode served by a host.

A ``sandboxed`` plugin's code never runs in the kernel process. The loader reads its
manifest (without running it), checks its prefix and requirements like any other, then
hands the rest — import, config validation, ``on_load`` — to the host registered for its
mode in ``kernel.hosts`` (:mod:`kernel.hosts`), and mounts what the host answers: a
runtime whose ``asgi_app`` and ``run_sync`` reach the plugin where it runs. With no host
for the mode, the plugin is refused at stage ``mode`` and nothing of it runs.

Operators may force a mode: with ``services.loader.archive_mode: sandboxed`` a plugin
installed from an archive runs sandboxed whatever its manifest says.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from kernel.hosts import HostError, HostRequest, PluginHost

from .context import LoadedContext
from .generation import Generation, StageError
from .importer import ImportedPlugin
from .installer import is_archive
from .manifest import Manifest

if TYPE_CHECKING:
    from kernel.kernel import Kernel

    from .lifecycle import Lifecycle

__all__ = ["build_hosted", "effective_mode", "host_of"]


def effective_mode(manifest: Manifest, row: dict[str, Any] | None, archive_mode: str) -> Manifest:
    """``manifest`` with the mode the operator forces on archive installs, if any."""
    if archive_mode == "manifest" or manifest.mode == archive_mode or row is None:
        return manifest
    source = row.get("source")
    if not source or not is_archive(Path(source)):
        return manifest
    return dataclasses.replace(manifest, mode=archive_mode)


def host_of(kernel: Kernel, name: str, manifest: Manifest) -> PluginHost | None:
    """The host of a non-trusted plugin (None: trusted); refuses a mode nobody hosts."""
    if manifest.mode == "trusted":
        return None
    host = kernel.hosts.get(manifest.mode)
    if host is None:
        raise StageError(
            "mode",
            f"plugin {name!r}: run.py: key 'mode': no service hosts {manifest.mode!r} plugins "
            "here (the sandbox service is not running); the plugin was not run",
        )
    return host


async def build_hosted(
    lc: Lifecycle,
    host: PluginHost,
    name: str,
    folder: Path,
    manifest: Manifest,
    raw_config: dict[str, Any],
    digest: str,
    generation: int,
) -> Generation:
    """Have ``host`` start the generation; the caller mounts it."""
    data_dir = lc.data_dir / "plugins" / name
    await asyncio.to_thread(data_dir.mkdir, parents=True, exist_ok=True)
    request = HostRequest(
        name=name,
        generation=generation,
        version=manifest.version,
        folder=folder,
        data_dir=data_dir,
        prefix=manifest.prefix,
        limits=dict(manifest.limits),
        network=manifest.network,
        config=raw_config,
    )
    try:
        hosted = await host.load(request)
    except HostError as exc:
        raise StageError(exc.stage, exc.message, generation=generation) from None  # type: ignore[arg-type]
    runtime = hosted.runtime
    try:
        if runtime.prefix != manifest.prefix:
            lc._claim(name, runtime.prefix, "mount")
    except BaseException:
        await host.stop(name, generation, "its prefix is taken")
        raise
    # The kernel-side context: events appended for the plugin, its logger, the raw config.
    ctx = LoadedContext(lc.kernel, name, generation, raw_config, data_dir)
    runtime.context = ctx
    imported = ImportedPlugin(
        run=ModuleType(f"xcore_hosted.{name}"),
        router=None,
        prefix=runtime.prefix,
        routes=list(hosted.routes),
        tasks=dict(runtime.tasks),
        config_model=None,
    )
    gen = Generation(name, generation, folder, manifest, digest, imported, ctx, runtime, {})
    lc.kernel.plugins.put(runtime)
    return gen
