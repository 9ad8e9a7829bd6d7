"""Events of the router mounter: its public contract.

The mounter reacts to ``PluginLoaded`` (looking the generation up in
``kernel.plugins``) with ``RoutesMounted`` or ``RouteConflict``, and to
``PluginUnloaded`` with ``RoutesUnmounted``; each outcome carries the cause's
correlation id. Stream: ``routes-<plugin>``.
"""

from __future__ import annotations

from kernel.events import Event

__all__ = ["RouteConflict", "RoutesMounted", "RoutesUnmounted", "stream_of"]


def stream_of(plugin: str) -> str:
    return f"routes-{plugin}"


class RoutesMounted(Event):
    """The generation's routes are served under ``prefix`` (the dispatcher swapped)."""

    plugin: str
    generation: int
    prefix: str
    paths: list[str]


class RoutesUnmounted(Event):
    """The generation's routes are no longer served."""

    plugin: str
    generation: int
    prefix: str


class RouteConflict(Event):
    """The generation was not mounted: its paths collide with another owner's."""

    plugin: str
    generation: int
    prefix: str
    conflicts_with: str
    paths: list[str]
    reason: str
