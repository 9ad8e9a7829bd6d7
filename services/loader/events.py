"""Events of the plugin loader: its public contract (other services may import this).

Stream: ``plugin-<name>`` for everything about one plugin.
Request events (``PluginReloadRequested``, ``PluginEnabled``, ``PluginDisabled``,
``PluginUninstalled``) are answered by outcome events carrying the request's
correlation id, so ``kernel.request(...)`` can await them.
"""

from __future__ import annotations

from typing import Literal

from kernel.events import Event

__all__ = [
    "LoadStage",
    "PluginConfigChanged",
    "PluginDisabled",
    "PluginDiscovered",
    "PluginEnabled",
    "PluginInstallFailed",
    "PluginInstallRequested",
    "PluginInstalled",
    "PluginLoadFailed",
    "PluginLoaded",
    "PluginReloadFailed",
    "PluginReloadPaused",
    "PluginReloadRequested",
    "PluginReloaded",
    "PluginRequestSkipped",
    "PluginUninstallFailed",
    "PluginUninstallRequested",
    "PluginUninstalled",
    "PluginUnloaded",
    "stream_of",
]

#: Stream of requests that name no single plugin yet (installs, reload-all).
PLUGINS_STREAM = "plugins"

LoadStage = Literal[
    "manifest",
    "dependency",
    "config",
    "import",
    "hook",
    "mount",
    "mode",
    "disabled",
    "paused",
    "internal",
]


def stream_of(plugin: str) -> str:
    return f"plugin-{plugin}"


class PluginDiscovered(Event):
    """A plugin folder was found in the plugins directory (its manifest is valid)."""

    name: str
    version: str
    path: str


class PluginInstalled(Event):
    """A plugin was copied into the plugins directory from a folder or an archive."""

    name: str
    version: str
    source: str
    digest: str


class PluginInstallRequested(Event):
    """Someone asked to install the plugin folder or archive at ``source`` (a local path).

    Outcome: ``PluginInstallFailed``, or ``PluginInstalled`` followed by the load's
    outcome (``PluginLoaded`` / ``PluginLoadFailed``, or ``PluginReloaded`` /
    ``PluginReloadFailed`` when it replaced a loaded plugin).
    """

    source: str
    #: Replace an installed plugin of the same name (otherwise that is refused).
    replace: bool = False


class PluginInstallFailed(Event):
    """An install was refused; the plugins directory is as it was before the request.

    ``stage`` is set when the new version was copied but failed to load (its files were
    rolled back, and a replaced version keeps serving).
    """

    source: str
    error: str
    name: str | None = None
    stage: LoadStage | None = None
    traceback: str = ""


class PluginUninstallRequested(Event):
    """Someone asked to uninstall a plugin. Outcome: ``PluginUninstalled`` or ``PluginUninstallFailed``."""

    name: str


class PluginUninstallFailed(Event):
    """An uninstall was refused (e.g. other loaded plugins require it); nothing changed."""

    name: str
    error: str


class PluginUninstalled(Event):
    """A plugin was removed from the plugins directory (unloaded first)."""

    name: str


class PluginEnabled(Event):
    """The plugin should be loaded (desired state)."""

    name: str


class PluginDisabled(Event):
    """The plugin should not be loaded (desired state); it stays installed."""

    name: str


class PluginLoaded(Event):
    """A generation of the plugin is imported, its hooks ran, its routes are mounted."""

    name: str
    version: str
    generation: int
    mode: Literal["trusted", "sandboxed"]
    prefix: str | None
    routes: list[str]
    tasks: list[str]
    digest: str
    duration_ms: float


class PluginLoadFailed(Event):
    """Loading the plugin failed at ``stage``; nothing of that generation stays."""

    name: str
    stage: LoadStage
    error: str
    traceback: str = ""
    generation: int | None = None
    #: The plugin file (relative to its folder) and line at fault, when known.
    file: str | None = None
    line: int | None = None


class PluginReloadRequested(Event):
    """Someone (the watcher, the admin API, the CLI) asked to reload a plugin (None: all)."""

    name: str | None
    reason: str = ""


class PluginReloaded(Event):
    """A new generation replaced the old one, which is unloaded."""

    name: str
    version: str
    old_generation: int | None
    generation: int
    duration_ms: float


class PluginReloadFailed(Event):
    """A reload failed at ``stage``; the previous generation (if any) keeps serving."""

    name: str
    stage: LoadStage
    error: str
    traceback: str = ""
    serving_generation: int | None = None
    #: The generation that was being built and was thrown away (None: failed before import).
    generation: int | None = None
    #: The plugin file (relative to its folder) and line at fault, when known.
    file: str | None = None
    line: int | None = None


class PluginUnloaded(Event):
    """A generation was unloaded: its routes, tasks and subscriptions are gone."""

    name: str
    generation: int
    reason: str = ""


class PluginRequestSkipped(Event):
    """A request to the loader needed nothing done (a disable of a plugin no longer
    loaded, a reload of all when none is enabled): its answer, so that it reads
    ``succeeded`` after a restart too, not ``abandoned``."""

    request: str
    name: str | None = None
    detail: str = "nothing to change"


class PluginReloadPaused(Event):
    """The watcher's reloads of a plugin were paused: it kept reloading without a pause.

    Usually the plugin writes into its own folder; it should use ``context.data_dir``.
    A reload asked through the admin API or the CLI resumes the watcher's reloads.
    """

    name: str
    reloads: int
    window_s: float
    reason: str


class PluginConfigChanged(Event):
    """The plugin's ``config.yaml`` changed (and validated)."""

    name: str
    digest: str
