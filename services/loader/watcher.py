"""The plugins-directory watcher: file changes become reload requests.

:func:`watch` follows the plugins directory with watchfiles (inotify where available),
groups changes until none came for ``debounce_ms`` (at most ``max_debounce_ms``), maps
each changed path to its plugin folder, and hands the set of names to a callback (the
loader records ``PluginReloadRequested{actor: watcher}`` for each). Hidden entries (the
installer's staging area, editor swap files) and bytecode caches are ignored.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import watchfiles

from .files import printable

__all__ = ["plugin_of", "watch"]

log = logging.getLogger("xcore.loader.watcher")

OnChange = Callable[[dict[str, set[str]]], Awaitable[None]]


def plugin_of(plugins_dir: Path, path: str) -> tuple[str, str] | None:
    """``(plugin, file)`` for a changed path, or None when the change is noise."""
    try:
        rel = Path(path).relative_to(plugins_dir)
    except ValueError:
        return None
    parts = rel.parts
    if not parts or printable(parts[0]) != parts[0]:
        return None  # not a plugin name (the loader reports such folders)
    for part in parts:
        if part.startswith(".") or part == "__pycache__" or part.endswith("~"):
            return None
    if parts[-1].endswith((".pyc", ".pyo", ".swp", ".swx", ".tmp")):
        return None
    return parts[0], "/".join(parts[1:])


async def watch(
    plugins_dir: Path,
    on_change: OnChange,
    stop: asyncio.Event,
    *,
    debounce_ms: int,
    max_debounce_ms: int,
    ready: asyncio.Event | None = None,
) -> None:
    """Watch until ``stop`` is set; a failing callback is logged, never fatal."""
    root = plugins_dir  # the caller passes a resolved path
    first = True
    async for changes in watchfiles.awatch(
        root,
        stop_event=stop,
        debounce=max_debounce_ms,
        step=debounce_ms,
        yield_on_timeout=True,
        rust_timeout=200,
        recursive=True,
    ):
        if first and ready is not None:
            ready.set()
            first = False
        by_plugin: dict[str, set[str]] = {}
        for _, path in changes:
            hit = plugin_of(root, path)
            if hit is not None:
                by_plugin.setdefault(hit[0], set()).add(hit[1])
        if not by_plugin:
            continue
        try:
            await on_change(by_plugin)
        except Exception:
            log.exception("the watcher could not request reloads for %s", sorted(by_plugin))
