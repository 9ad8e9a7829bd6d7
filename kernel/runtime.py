"""The in-process directory of loaded plugin generations.

Events say *what* happened (``PluginLoaded{name, generation, ...}``); the objects a
loaded plugin consists of — its router, its task functions, its context — cannot travel
in an event. The loader publishes them here before it records ``PluginLoaded``, and the
services that react (router mounter, scheduler) look them up by name and generation.
A service never imports another service to reach them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from kernel.access import AuthSpec
from kernel.errors import XcoreError
from kernel.sdk import PluginContext, TaskSpec

__all__ = ["PluginDirectory", "PluginRuntime"]

#: Runs a plugin's sync callable off the event loop (thread or sandbox) and awaits it.
SyncRunner = Callable[..., Awaitable[Any]]


@dataclass(eq=False)
class PluginRuntime:
    """One loaded generation of a plugin."""

    name: str
    generation: int
    version: str
    mode: str
    #: The mount prefix (the manifest's ``api_prefix``), or None for a plugin without routes.
    prefix: str | None
    #: The plugin's ``fastapi.APIRouter`` (trusted mode), or None.
    router: Any | None
    #: An ASGI app that serves the plugin's routes itself (a sandbox proxy); None for a
    #: trusted plugin, whose ``router`` the router mounter wraps in an app of its own.
    asgi_app: Any | None = None
    tasks: dict[str, TaskSpec] = field(default_factory=dict)
    context: PluginContext | None = None
    module: ModuleType | None = None
    #: How this plugin's sync code is run off the loop.
    run_sync: SyncRunner | None = None
    #: What its routes require (``kernel.access.AuthSpec`` from the manifest's ``auth``).
    auth: AuthSpec = field(default_factory=AuthSpec)
    #: Free slots for services (e.g. the router's per-generation app stats).
    extra: dict[str, Any] = field(default_factory=dict)


class PluginDirectory:
    """Maps (plugin, generation) to its runtime objects; one instance per kernel."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, int], PluginRuntime] = {}

    def put(self, runtime: PluginRuntime) -> None:
        self._by_key[(runtime.name, runtime.generation)] = runtime

    def get(self, name: str, generation: int) -> PluginRuntime:
        try:
            return self._by_key[(name, generation)]
        except KeyError:
            raise XcoreError(f"plugin {name!r} has no loaded generation {generation}") from None

    def find(self, name: str, generation: int) -> PluginRuntime | None:
        return self._by_key.get((name, generation))

    def generations(self, name: str) -> list[PluginRuntime]:
        return sorted(
            (rt for (n, _), rt in self._by_key.items() if n == name), key=lambda rt: rt.generation
        )

    def remove(self, name: str, generation: int) -> PluginRuntime | None:
        return self._by_key.pop((name, generation), None)

    def all(self) -> list[PluginRuntime]:
        return list(self._by_key.values())
