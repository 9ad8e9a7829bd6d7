"""Importing a plugin's code: one package per plugin, fresh code on every generation.

A plugin folder is imported as the package ``xcore_plugins.<name>`` (``run.py`` becomes
``xcore_plugins.<name>.run``, a helper ``util.py`` ``xcore_plugins.<name>.util``), found
by a small meta-path finder that maps the package to its folder. Before a generation is
imported, every ``xcore_plugins.<name>...`` entry is taken out of :data:`sys.modules`
(and put back if the import fails), so a reload runs the new code of *every* module of
the plugin, while the modules of the serving generation live on in the objects that
reference them. Sources are compiled straight from the files, never from ``__pycache__``:
a stale bytecode file (same size, same second) cannot hide an edit.

This module runs plugin code: call :func:`import_plugin` in a worker thread.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import inspect
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from kernel.prefixes import PrefixError, mount_point
from kernel.sdk import TaskSpec

__all__ = [
    "ROOT_PACKAGE",
    "ImportedPlugin",
    "PluginImportError",
    "import_plugin",
    "module_name",
    "purge",
    "restore",
]

ROOT_PACKAGE = "xcore_plugins"


class PluginImportError(Exception):
    """The plugin's code imported, but what it defines is unusable (named in the message)."""


def module_name(plugin: str) -> str:
    return f"{ROOT_PACKAGE}.{plugin}"


class _SourceLoader(importlib.abc.Loader):
    """Executes a plugin source file, compiled from the file itself (no bytecode cache)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        if self.path is None:  # a plugin folder without __init__.py
            return
        source = self.path.read_bytes()
        code = compile(source, str(self.path), "exec", dont_inherit=True)
        exec(code, module.__dict__)

    def get_source(self, fullname: str) -> str | None:
        return None if self.path is None else self.path.read_text(encoding="utf-8")


class _PluginFinder(importlib.abc.MetaPathFinder):
    """Maps ``xcore_plugins.<name>[.sub...]`` to the files of the plugin's folder."""

    def __init__(self) -> None:
        self.roots: dict[str, Path] = {}

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None = None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        parts = fullname.split(".")
        if len(parts) < 2 or parts[0] != ROOT_PACKAGE:
            return None
        root = self.roots.get(parts[1])
        if root is None:
            return None
        base = root.joinpath(*parts[2:])
        if len(parts) == 2 or base.is_dir():
            init = base / "__init__.py"
            if len(parts) > 2 and not init.is_file():
                return None
            spec = importlib.machinery.ModuleSpec(
                fullname,
                _SourceLoader(init if init.is_file() else None),
                origin=str(init) if init.is_file() else str(base),
                is_package=True,
            )
            spec.submodule_search_locations = [str(base)]
            spec.has_location = init.is_file()
            return spec
        file = base.with_name(base.name + ".py")
        if not file.is_file():
            return None
        spec = importlib.machinery.ModuleSpec(fullname, _SourceLoader(file), origin=str(file))
        spec.has_location = True
        return spec


_finder = _PluginFinder()
_install_lock = threading.Lock()


def _install_finder() -> None:
    with _install_lock:
        if ROOT_PACKAGE not in sys.modules:
            root = ModuleType(ROOT_PACKAGE, "Packages of the loaded xcore plugins.")
            root.__path__ = []
            sys.modules[ROOT_PACKAGE] = root
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)


def purge(plugin: str) -> dict[str, ModuleType]:
    """Take the plugin's modules out of ``sys.modules``; returns them for :func:`restore`."""
    base = module_name(plugin)
    removed = {}
    for name in [n for n in sys.modules if n == base or n.startswith(base + ".")]:
        removed[name] = sys.modules.pop(name)
    return removed


def restore(plugin: str, modules: dict[str, ModuleType]) -> None:
    """Put back the modules :func:`purge` removed (dropping whatever replaced them)."""
    purge(plugin)
    sys.modules.update(modules)


@dataclass
class ImportedPlugin:
    """What importing a plugin generation produced."""

    run: ModuleType
    #: The plugin's APIRouter (None when it has no routes).
    router: APIRouter | None
    prefix: str | None
    #: "GET /app/hello/status"-style descriptions of the routes (full paths).
    routes: list[str]
    tasks: dict[str, TaskSpec]
    config_model: type[BaseModel] | None
    hooks: dict[str, Any] = field(default_factory=dict)


def import_plugin(plugin: str, folder: Path, manifest_prefix: str | None) -> ImportedPlugin:
    """Import the plugin's package, ``run.py``, ``router.py`` and ``config.py`` afresh.

    The caller purges (and on failure restores) ``sys.modules``; exceptions raised by
    the plugin's code propagate unchanged.
    """
    _install_finder()
    _finder.roots[plugin] = folder
    base = module_name(plugin)
    importlib.invalidate_caches()
    importlib.import_module(base)
    run = importlib.import_module(base + ".run")
    router_module = (
        importlib.import_module(base + ".router") if (folder / "router.py").is_file() else None
    )
    config_model = _config_model(plugin, run, folder, base)
    router, prefix, routes = None, None, []
    if router_module is not None:
        raw = getattr(router_module, "router", None)
        if raw is None:
            raise PluginImportError("router.py defines no `router` (an APIRouter)")
        if not isinstance(raw, APIRouter):
            raise PluginImportError(
                f"router.py: `router` is a {type(raw).__name__}, not an APIRouter"
            )
        if raw.routes:
            try:
                point = mount_point(manifest_prefix, raw.prefix)
            except PrefixError as exc:
                raise PluginImportError(f"router.py: {exc}") from None
            prefix = point.prefix
            router, routes = raw, describe_routes(raw, point.root)
    tasks: dict[str, TaskSpec] = {}
    seen: set[int] = set()
    for value in vars(run).values():
        specs = getattr(value, "__xcore_tasks__", None) or [getattr(value, "__xcore_task__", None)]
        for spec in specs:
            if not isinstance(spec, TaskSpec) or id(spec) in seen:
                continue  # the same function under two names is one declaration
            seen.add(id(spec))
            # Two declarations of one name both reach the scheduler, which refuses them
            # (TaskRejected) rather than one silently replacing the other.
            key = spec.name if spec.name not in tasks else f"{spec.name}#{len(tasks)}"
            tasks[key] = spec
    hooks = {}
    for hook in ("on_load", "on_unload"):
        fn = getattr(run, hook, None)
        if fn is not None:
            if not callable(fn):
                raise PluginImportError(f"run.py: `{hook}` is not callable")
            hooks[hook] = fn
    return ImportedPlugin(run, router, prefix, routes, tasks, config_model, hooks)


def _config_model(plugin: str, run: ModuleType, folder: Path, base: str) -> type[BaseModel] | None:
    model = getattr(run, "Config", None)
    where = "run.py"
    if model is None and (folder / "config.py").is_file():
        model = getattr(importlib.import_module(base + ".config"), "Config", None)
        where = "config.py"
    if model is None:
        return None
    if not (inspect.isclass(model) and issubclass(model, BaseModel)):
        raise PluginImportError(f"{where}: `Config` must be a pydantic BaseModel subclass")
    return model


def describe_routes(router: APIRouter, root: str) -> list[str]:
    """``"GET /app/hello/status"`` for each route (``root`` + the route's own path)."""
    out: list[str] = []
    for route in router.routes:
        path = getattr(route, "path", None)
        if path is None:
            continue
        full = root + path
        methods = sorted(getattr(route, "methods", None) or ["WS"])
        out.extend(f"{m} {full}" for m in methods if m != "HEAD")
    return sorted(out)
