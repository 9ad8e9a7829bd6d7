"""The router state as a projection: which prefix each plugin's serving generation holds.

Folded from ``RoutesMounted`` / ``RoutesUnmounted`` / ``RouteConflict`` (and
``KernelStarted``: a new boot of a node starts with nothing mounted on that node, as
mounts live in the process that served them). Other services and the replay tool may
import it::

    routes = kernel.projection(MountedRoutes)
    routes.mounts["hello"].prefix            # "/app/hello"
    routes.owner("/app/hello/status")        # "hello"
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from kernel import Projection, Recorded, handles
from kernel.prefixes import under
from services.router.events import RouteConflict, RoutesMounted, RoutesUnmounted

__all__ = ["ConflictRecord", "MountRecord", "MountedRoutes"]


@dataclass(slots=True)
class MountRecord:
    """A plugin generation whose routes are served."""

    plugin: str
    generation: int
    prefix: str
    paths: list[str]
    node: str | None
    #: Log position of its ``RoutesMounted``.
    position: int


@dataclass(slots=True)
class ConflictRecord:
    """The last refused mount of a plugin (cleared when a generation of it mounts)."""

    plugin: str
    generation: int
    prefix: str
    conflicts_with: str
    reason: str
    paths: list[str] = field(default_factory=list)
    position: int = 0


class MountedRoutes(Projection):
    """Mounted prefixes by plugin, and the last conflict of each plugin."""

    name = "router.mounts"

    def reset(self) -> None:
        self.mounts: dict[str, MountRecord] = {}
        self.conflicts: dict[str, ConflictRecord] = {}

    @handles(RoutesMounted)
    def _mounted(self, r: Recorded) -> None:
        d = r.data
        self.conflicts.pop(d["plugin"], None)
        if not d["prefix"]:
            # a generation without routes replaced whatever the plugin served before
            self.mounts.pop(d["plugin"], None)
            return
        self.mounts[d["plugin"]] = MountRecord(
            plugin=d["plugin"],
            generation=d["generation"],
            prefix=d["prefix"],
            paths=list(d["paths"]),
            node=r.meta.node,
            position=r.position,
        )

    @handles(RoutesUnmounted)
    def _unmounted(self, r: Recorded) -> None:
        d = r.data
        current = self.mounts.get(d["plugin"])
        if current is not None and current.generation == d["generation"]:
            del self.mounts[d["plugin"]]

    @handles(RouteConflict)
    def _conflict(self, r: Recorded) -> None:
        d = r.data
        self.conflicts[d["plugin"]] = ConflictRecord(
            plugin=d["plugin"],
            generation=d["generation"],
            prefix=d["prefix"],
            conflicts_with=d["conflicts_with"],
            reason=d["reason"],
            paths=list(d["paths"]),
            position=r.position,
        )

    @handles("KernelStarted")
    def _booted(self, r: Recorded) -> None:
        node = r.data.get("node")
        for plugin in [p for p, m in self.mounts.items() if m.node == node]:
            del self.mounts[plugin]

    def owner(self, path: str) -> str | None:
        """The plugin whose mounted prefix ``path`` falls under (longest prefix wins)."""
        best: MountRecord | None = None
        for mount in self.mounts.values():
            if under(path, mount.prefix) and (best is None or len(mount.prefix) > len(best.prefix)):
                best = mount
        return None if best is None else best.plugin

    def as_dict(self) -> dict[str, Any]:
        return {
            "mounts": {p: asdict(m) for p, m in sorted(self.mounts.items())},
            "conflicts": {p: asdict(c) for p, c in sorted(self.conflicts.items())},
        }
