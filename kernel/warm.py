"""FastAPI's lazily built route state, built ahead of the first request.

Guarantee: once :func:`warm_routes` ran on a router, a request it serves does not build
route state on the event loop: the first admin request after the boot (a reload, an
install) costs what the next ones cost. (A plugin generation's routes are built in the
mount's thread: services/router/mounts.py ``route_paths`` walks them.)

Why: FastAPI (0.16x) includes a router lazily. The first request that reaches an
included router builds, for every route of it, its "effective context" (the route again
for the include's prefix, dependencies and responses: its dependant and the pydantic
adapters of its fields). For the kernel's admin routers that is 15-35 ms of the event
loop in one piece, paid by every request waiting behind the first admin request.

Mechanism: every included router of ``router`` (and theirs, recursively) is asked for
its candidates and its low-priority routes, which builds and caches them (FastAPI keys
the cache by the routes' version, so a later change of the routes is built again at its
first request, as before). A FastAPI without these methods is left alone; a failure is
logged with the router's prefix and left for the first request (which raises it there).
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["warm_routes"]

log = logging.getLogger("xcore.http")


def warm_routes(router: Any, *, where: str = "the app") -> int:
    """Build the lazily built state of every router included in ``router``; the number
    of included routers built (0 with a FastAPI that builds nothing lazily)."""
    built = 0
    stack = list(getattr(router, "routes", ()) or ())
    while stack:
        route = stack.pop()
        candidates = getattr(route, "effective_candidates", None)
        if not callable(candidates):
            continue
        try:
            children = list(candidates())
            low = getattr(route, "effective_low_priority_routes", None)
            if callable(low):
                low()
        except Exception:
            prefix = getattr(getattr(route, "include_context", None), "prefix", "?")
            log.warning(
                "%s: FastAPI could not build the routes included under %r ahead of their "
                "first request (left to it)",
                where,
                prefix,
                exc_info=True,
            )
            continue
        built += 1
        stack.extend(child for child in children if hasattr(child, "effective_candidates"))
    return built
