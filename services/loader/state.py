"""The loader's shared state: the serving generations, the lock, and what they are read from.

:class:`LoaderState` is the base of :class:`~services.loader.core.Loader`: the attributes
and queries every operation of the loader (a generation's lifecycle, the boot, the
answers to requests) and the admin API read.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

from kernel.events import Event, Recorded

from . import installer
from .events import stream_of
from .generation import Generation
from .projection import PluginTable
from .settings import LoaderSettings

if TYPE_CHECKING:
    from kernel.kernel import Kernel

__all__ = ["ACTOR", "LoaderState"]

#: The actor of the loader's own events (its reactions to requests carry the request's ids).
ACTOR = "loader"


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
        #: The serving generation of each loaded plugin.
        self.loaded: dict[str, Generation] = {}
        #: Digest of the last folder content each plugin was (re)loaded from, success or not.
        self.attempted: dict[str, str] = {}

    async def record(
        self, event: Event, *, cause: Recorded | None = None, stream: str | None = None
    ) -> Recorded:
        """Append one of the loader's events (default stream: the plugin's)."""
        name = getattr(event, "name", None)
        target = stream or stream_of(name if isinstance(name, str) else "unknown")
        return (await self.kernel.append(event, stream=target, actor=ACTOR, cause=cause))[0]

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
