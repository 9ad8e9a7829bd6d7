"""The service interface, and how the kernel finds the services it starts.

A service is anything with a ``name`` and ``async start(kernel, stack)``. In ``start``
it subscribes, adds projections, contributes HTTP routes, and registers its own
teardown on ``stack`` (an :class:`contextlib.AsyncExitStack`), so stopping the kernel
undoes every start in exact reverse order.

The kernel never imports ``services/`` by name: installed services are found through
the ``xcore.services`` entry point group (declared in ``pyproject.toml``). Each service
class may set ``order`` (lower starts first; default 100).
"""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from kernel.errors import XcoreError

if TYPE_CHECKING:
    from kernel.kernel import Kernel

__all__ = ["Service", "discover_services"]

log = logging.getLogger("xcore.services")

GROUP = "xcore.services"


@runtime_checkable
class Service(Protocol):
    """A component started by the kernel; it talks to other services only through events."""

    name: str

    async def start(self, kernel: Kernel, stack: AsyncExitStack) -> None:
        """Start, registering every cleanup on ``stack``."""
        ...


def discover_services(names: list[str] | None = None) -> list[Service]:
    """Instantiate the services registered under the ``xcore.services`` entry points.

    ``names`` limits (and orders ties of) the selection; an unknown name is an error.
    """
    found = {ep.name: ep for ep in entry_points(group=GROUP)}
    if names is not None:
        missing = [n for n in names if n not in found]
        if missing:
            raise XcoreError(
                f"unknown service(s) {', '.join(missing)}; installed: {', '.join(sorted(found)) or 'none'}"
            )
        selected = [found[n] for n in names]
    else:
        selected = list(found.values())
    services: list[Service] = []
    for ep in selected:
        try:
            cls = ep.load()
        except Exception as exc:
            raise XcoreError(f"service {ep.name!r} ({ep.value}) failed to import: {exc!r}") from exc
        services.append(cls())
    services.sort(key=lambda s: getattr(s, "order", 100))
    return services
