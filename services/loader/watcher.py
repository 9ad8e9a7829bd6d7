"""The plugins-directory watcher: file changes become reload requests.

:func:`watch` follows the plugins directory with watchfiles (inotify where available),
groups changes until none came for ``debounce_ms`` (at most ``max_debounce_ms``), maps
each changed path to its plugin folder, and hands the set of names to a callback (the
loader records ``PluginReloadRequested{actor: watcher}`` for each). Hidden entries (the
installer's staging area, editor swap files) and bytecode caches are ignored. A watch
that fails (watchfiles raises on a path that is not valid UTF-8) is logged at ERROR and
started again, then every plugin folder is handed to the callback (whose digest check
reloads only the changed ones): one odd file name never ends hot reload, and the changes
of the batch it broke are not lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
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
    restart_delay: float = 1.0,
) -> None:
    """Watch until ``stop`` is set; a failing callback is logged, never fatal.

    A failing watch is logged and started again after ``restart_delay``: watchfiles
    raises when a changed path is not valid UTF-8 (``bad\\xff.py`` anywhere in the
    plugins directory), which ended hot reload for every plugin, silently.
    """
    root = plugins_dir  # the caller passes a resolved path
    rescan = False
    while not stop.is_set():
        try:
            await _watch_once(
                root, on_change, stop, debounce_ms, max_debounce_ms, ready, rescan=rescan
            )
        except Exception as exc:  # an ExceptionGroup from watchfiles' task group too
            log.error(
                "the plugins watcher failed (%s); watching %s again in %.0f s, then every "
                "plugin folder is compared with what was loaded from it",
                _reasons(exc),
                printable(str(root)),
                restart_delay,
            )
            rescan = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), restart_delay)


def _plugin_folders(root: Path) -> set[str]:
    names = set()
    with os.scandir(root) as it:
        for entry in it:
            hit = plugin_of(root, entry.path)
            if hit is not None and entry.is_dir():
                names.add(hit[0])
    return names


def _reasons(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_reasons(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {printable(str(exc))}"


async def _watch_once(
    root: Path,
    on_change: OnChange,
    stop: asyncio.Event,
    debounce_ms: int,
    max_debounce_ms: int,
    ready: asyncio.Event | None,
    *,
    rescan: bool,
) -> None:
    async for changes in watchfiles.awatch(
        root,
        stop_event=stop,
        debounce=max_debounce_ms,
        step=debounce_ms,
        yield_on_timeout=True,
        rust_timeout=200,
        recursive=True,
    ):
        if ready is not None and not ready.is_set():
            ready.set()
        by_plugin: dict[str, set[str]] = {}
        if rescan:  # watching again: the changes of the failed batch were lost
            rescan = False
            # '' is the folder itself: the loader compares its digest with the last load
            by_plugin = {name: {""} for name in await asyncio.to_thread(_plugin_folders, root)}
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
