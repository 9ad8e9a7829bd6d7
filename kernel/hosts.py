"""Plugin hosts: who runs a plugin whose code must not run in the kernel process.

The loader runs a ``trusted`` plugin itself (import, hooks, routes and tasks in this
process). For any other mode it asks ``kernel.hosts`` for the host registered under that
mode (the sandbox service registers ``sandboxed``) and hands it a :class:`HostRequest`;
the host starts the plugin wherever it runs it, and answers with a
:class:`~kernel.runtime.PluginRuntime` whose ``asgi_app`` and ``run_sync`` reach that
place, plus what the loader records (routes, tasks). No mode without a host is ever run:
the loader refuses it at stage ``mode``. The loader never imports a host's service, and
the host never imports the loader: this module is the whole seam.

Stopping a hosted generation is the host's business, triggered by the loader's
``PluginUnloaded`` event (the host subscribes to it); ``describe`` adds the host's view
of a plugin (level, limits, stats) to the admin API's plugin rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kernel.errors import XcoreError
from kernel.runtime import PluginRuntime

__all__ = ["HostError", "HostRequest", "HostedPlugin", "PluginHost", "PluginHosts"]


class HostError(XcoreError):
    """A host could not start a generation; ``stage`` is the loader's stage it failed at
    (``import``, ``config``, ``hook``, ``mode``...) and the message names the culprit."""

    def __init__(self, stage: str, message: str, *, traceback: str = "") -> None:
        super().__init__(message)
        self.stage = stage
        self.message = message
        self.traceback = traceback


@dataclass(frozen=True)
class HostRequest:
    """What the loader knows of a generation before any of its code runs."""

    name: str
    generation: int
    version: str
    folder: Path
    #: The plugin's writable folder (kept across reloads).
    data_dir: Path
    #: The manifest's ``api_prefix`` (None: the router's own prefix decides).
    prefix: str | None
    #: The manifest's ``limits`` (bytes and seconds, already parsed).
    limits: dict[str, float]
    #: The manifest asks for network access.
    network: bool
    #: ``config.yaml`` as parsed (the host validates it against the plugin's model).
    config: dict[str, Any]


@dataclass(eq=False)
class HostedPlugin:
    """A generation started by a host."""

    runtime: PluginRuntime
    #: ``"GET /app/x/status"``-style descriptions of the routes (full paths).
    routes: list[str] = field(default_factory=list)


class PluginHost(Protocol):
    """Runs plugins of one mode outside the kernel process."""

    async def load(self, request: HostRequest) -> HostedPlugin:
        """Start a generation (import, config, ``on_load``); raise :class:`HostError`."""
        ...

    async def stop(self, name: str, generation: int, reason: str) -> None:
        """Stop a generation the loader gave up before recording it (no event follows)."""
        ...

    def describe(self, name: str) -> dict[str, Any] | None:
        """The host's view of ``name`` for the admin API (None if it hosts none)."""
        ...


class PluginHosts:
    """Hosts by mode; one instance per kernel (``kernel.hosts``)."""

    def __init__(self) -> None:
        self._by_mode: dict[str, PluginHost] = {}

    def register(self, mode: str, host: PluginHost) -> None:
        if mode == "trusted":
            raise XcoreError("trusted plugins are run by the loader itself, not by a host")
        self._by_mode[mode] = host

    def unregister(self, mode: str, host: PluginHost) -> None:
        if self._by_mode.get(mode) is host:
            del self._by_mode[mode]

    def get(self, mode: str) -> PluginHost | None:
        return self._by_mode.get(mode)

    def describe(self, name: str, mode: str | None) -> dict[str, Any] | None:
        """What the host of ``mode`` says about plugin ``name`` (None: nothing)."""
        host = self._by_mode.get(mode) if mode else None
        if host is None:
            return None
        try:
            return host.describe(name)
        except Exception as exc:  # the admin API must answer even if a host is broken
            return {"error": f"{type(exc).__name__}: {exc}"}
