"""Importing a plugin's code: one package per plugin, fresh code on every generation.

A plugin folder is imported as the package ``xcore_plugins.<name>`` (``run.py`` becomes
``xcore_plugins.<name>.run``, a helper ``util.py`` ``xcore_plugins.<name>.util``), found
by a small meta-path finder that maps the package to its folder. Before a generation is
imported, every ``xcore_plugins.<name>...`` entry is taken out of :data:`sys.modules`
(and put back if the import fails), so a reload runs the new code of *every* module of
the plugin, while the modules of the serving generation live on in the objects that
reference them. Sources are compiled straight from the files, never from ``__pycache__``:
a stale bytecode file (same size, same second) cannot hide an edit. Each file is parsed
once per import: the trees the import check parsed are compiled when the file still
holds the same bytes (``source.py``).

This module runs plugin code: call :func:`import_plugin` in a worker thread.
"""

from __future__ import annotations

import ast
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import os
import stat
import sys
import threading
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from kernel.prefixes import PrefixError, mount_point
from kernel.sdk import TaskSpec

from . import lazy
from .files import FileRefused, kind, read_limited, regular_files
from .source import Parsed, compile_pieces, parse_checked

__all__ = [
    "MAX_IMPORT_DEPTH",
    "ROOT_PACKAGE",
    "ImportedPlugin",
    "PluginImportError",
    "import_plugin",
    "module_name",
    "modules_snapshot",
    "purge",
    "restore",
]

ROOT_PACKAGE = "xcore_plugins"


class PluginImportError(Exception):
    """The plugin's code imported, but what it defines is unusable (named in the message)."""

    def __init__(self, message: str, file: str | None = None, line: int | None = None) -> None:
        super().__init__(message)
        #: Read by the loader to name the file and line of the failure.
        self.plugin_file = file
        self.plugin_line = line


def module_name(plugin: str) -> str:
    return f"{ROOT_PACKAGE}.{plugin}"


#: Deepest chain of plugin modules importing one another (``a`` imports ``b`` at its top,
#: which imports ``c``...). Each level costs the thread's C stack: with a raised
#: recursion limit, 5,000 levels crashed the process instead of raising RecursionError.
MAX_IMPORT_DEPTH = 100
_nested = threading.local()


class _SourceLoader(importlib.abc.Loader):
    """Executes a plugin source file, compiled from the file itself (no bytecode cache)."""

    def __init__(self, path: Path | None, parsed: dict[str, Parsed] | None = None) -> None:
        self.path = path
        #: Files the import check already parsed (by path), shared by the plugin's loaders.
        self.parsed = parsed

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        if self.path is None:  # a plugin folder without __init__.py
            return
        source = read_limited(self.path)
        filename = str(self.path)
        known = self.parsed.pop(filename, None) if self.parsed is not None else None
        if known is None or known.source != source:
            known = parse_checked(source, filename)
        # a long file in pieces, the loop served between two (source.py)
        codes = compile_pieces(known.tree, filename)
        del known
        depth = getattr(_nested, "depth", 0)
        if depth >= MAX_IMPORT_DEPTH:
            raise ImportError(
                f"{module.__name__}: plugin modules import one another more than "
                f"{MAX_IMPORT_DEPTH} levels deep (the loader's limit)"
            )
        _nested.depth = depth + 1
        try:
            for code in codes:
                exec(code, module.__dict__)
        finally:
            _nested.depth = depth

    def get_source(self, fullname: str) -> str | None:
        if self.path is None:
            return None
        try:  # for tracebacks: the file may since be a FIFO, a link or huge
            data = read_limited(self.path)
        except (OSError, FileRefused):
            return None
        try:  # as the import system's loaders: its coding cookie or BOM, universal newlines
            return importlib.util.decode_source(data)
        except (SyntaxError, UnicodeDecodeError, LookupError, ValueError):
            return data.decode("utf-8", "replace")


class _PluginFinder(importlib.abc.MetaPathFinder):
    """Maps ``xcore_plugins.<name>[.sub...]`` to the files of the plugin's folder."""

    def __init__(self) -> None:
        self.roots: dict[str, Path] = {}
        #: Trees parsed by the import check of the import in progress, by plugin.
        self.parsed: dict[str, dict[str, Parsed]] = {}

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
        rel = "/".join(parts[2:])
        # lstat, never stat: a link (to a folder or file outside the plugin, which neither
        # the watcher nor the digest sees) or a special file is refused, naming it
        mode = _mode(base) if len(parts) > 2 else stat.S_IFDIR
        if mode is not None and stat.S_ISLNK(mode):
            raise ImportError(f"{rel} is a symbolic link; a plugin's modules live in its folder")
        if mode is not None and stat.S_ISDIR(mode):
            init = base / "__init__.py"
            init_mode = _mode(init)
            if init_mode is not None and not stat.S_ISREG(init_mode):
                where = f"{rel}/__init__.py" if rel else "__init__.py"
                raise ImportError(f"{where} is {kind(init_mode)}; only regular files are read")
            has_init = init_mode is not None
            if len(parts) > 2 and not has_init:
                return None
            spec = importlib.machinery.ModuleSpec(
                fullname,
                _SourceLoader(init if has_init else None, self.parsed.get(parts[1])),
                origin=str(init) if has_init else str(base),
                is_package=True,
            )
            spec.submodule_search_locations = [str(base)]
            spec.has_location = has_init
            return spec
        file = base.with_name(base.name + ".py")
        file_mode = _mode(file)
        if file_mode is None:
            return None
        if not stat.S_ISREG(file_mode):
            raise ImportError(f"{rel}.py is {kind(file_mode)}; only regular files are read")
        spec = importlib.machinery.ModuleSpec(
            fullname, _SourceLoader(file, self.parsed.get(parts[1])), origin=str(file)
        )
        spec.has_location = True
        return spec


def _mode(path: Path) -> int | None:
    try:
        return os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None


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


def modules_snapshot() -> dict[str, ModuleType]:
    """A copy of ``sys.modules`` taken in one step.

    Other plugins' import threads change ``sys.modules`` meanwhile. ``list(sys.modules)``
    or ``list(sys.modules.items())`` is not one step: the objects it allocates can start
    a collection, whose finalizers run Python code, which lets another thread in to add a
    module, and the iteration fails with "dictionary changed size during iteration" (seen
    at boot, when plugins import together). ``dict.copy`` allocates once, then copies.
    """
    return sys.modules.copy()


def invalidate_path_caches() -> None:
    """Make the path finders look at the disk again; safe while other threads import.

    ``importlib.invalidate_caches()`` is not: its ``PathFinder`` builds
    ``list(sys.path_importer_cache.items())``, and on CPython 3.11 a collection started by
    those tuples runs finalizers (Python code) that let another import thread add a path
    to that cache mid-iteration: "dictionary changed size during iteration", raised in an
    importing plugin with no frame of its own (seen at boot; reproduced in
    ``tests/services/loader/test_importer_caches.py``). Here the cache is copied in one
    step and each finder is told to forget its directory listing, which is all a
    plugin's import needs (the plugin's own modules come from :class:`_PluginFinder`).
    """
    for finder in sys.path_importer_cache.copy().values():
        invalidate = getattr(finder, "invalidate_caches", None)
        if invalidate is not None:
            invalidate()


def purge(plugin: str) -> dict[str, ModuleType]:
    """Take the plugin's modules out of ``sys.modules``; returns them for :func:`restore`."""
    base = module_name(plugin)
    removed = {}
    for name in [n for n in modules_snapshot() if n == base or n.startswith(base + ".")]:
        module = sys.modules.pop(name, None)  # a plugin thread may have removed it meanwhile
        if module is not None:
            removed[name] = module
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
    #: ``APIRouter(prefix=...)`` when that prefix gave the mount point (no ``api_prefix``).
    router_prefix: str | None = None


def import_plugin(
    plugin: str,
    folder: Path,
    manifest_prefix: str | None,
    allowed: Collection[str] | None = None,
    plugins_root: Path | None = None,
) -> ImportedPlugin:
    """Import the plugin's package, ``run.py``, ``router.py`` and ``config.py`` afresh.

    Before any code runs, every ``.py`` file is scanned: importing another plugin
    (``xcore_plugins.<other>``) is refused unless ``<other>`` is in ``allowed`` (the
    manifest's ``requires``). After the import, a module imported by a top-level name
    whose file lies in a plugin folder under ``plugins_root`` is refused (two plugins
    would share it, and it would never be reloaded).

    FastAPI's validators of the routes declared by the import are built at its end,
    paced (``lazy.py``): one that cannot be built raises :class:`lazy.FieldBuildError`.

    The caller purges (and on failure restores) ``sys.modules``; exceptions raised by
    the plugin's code propagate unchanged.
    """
    parsed: dict[str, Parsed] = {}
    if allowed is not None:
        check_plugin_imports(plugin, folder, allowed, parsed)
    _install_finder()
    _finder.roots[plugin] = folder
    _finder.parsed[plugin] = parsed
    try:
        base = module_name(plugin)
        invalidate_path_caches()
        with lazy.deferring() as deferred:
            importlib.import_module(base)
            run = importlib.import_module(base + ".run")
            router_module = (
                importlib.import_module(base + ".router") if _present(folder, "router.py") else None
            )
            config_model = _config_model(plugin, run, folder, base)
    finally:
        # (a module imported later, by a hook or a request, parses its file itself)
        if _finder.parsed.get(plugin) is parsed:
            del _finder.parsed[plugin]
        parsed.clear()
    router, prefix, routes, root = None, None, [], ""
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
            prefix, root = point.prefix, point.root
            router, routes = raw, describe_routes(raw, point.root)
    # before the generation can be mounted: a type pydantic cannot build refuses it here
    lazy.complete(deferred, router, root, folder)
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
                raise PluginImportError(f"run.py: `{hook}` is not callable", "run.py")
            hooks[hook] = fn
    if plugins_root is not None:
        check_stray_modules(plugin, plugins_root)
    router_prefix = None
    if router is not None and manifest_prefix is None:
        router_prefix = router.prefix
    return ImportedPlugin(
        run, router, prefix, routes, tasks, config_model, hooks, router_prefix=router_prefix
    )


def _plugin_modules_of(names: Sequence[str], plugin: str) -> Iterator[str]:
    for name in names:
        parts = name.split(".")
        if len(parts) >= 2 and parts[0] == ROOT_PACKAGE:
            yield parts[1]


def check_plugin_imports(
    plugin: str,
    folder: Path,
    allowed: Collection[str],
    parsed: dict[str, Parsed] | None = None,
) -> None:
    """Refuse ``import xcore_plugins.<other>`` of a plugin not in ``requires`` (any order).

    Each file parsed is put in ``parsed`` (by its path as the import system names it),
    for the import to compile without parsing it again.
    """
    root = folder.resolve()
    # regular files only, links not followed (a link loop or a FIFO is never entered)
    for path in sorted(p for p in regular_files(root, ("__pycache__",))[0] if p.suffix == ".py"):
        rel = path.relative_to(root).as_posix()
        try:
            source = read_limited(path)
            checked = parse_checked(source, filename=rel)
        except (FileRefused, OSError, SyntaxError, ValueError, MemoryError, RecursionError):
            continue  # the import itself reports what is wrong with this file
        if parsed is not None:
            parsed[str(folder / rel)] = checked
        for node in checked.imports:
            others: list[str] = []
            if isinstance(node, ast.Import):
                others = list(_plugin_modules_of([a.name for a in node.names], plugin))
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module == ROOT_PACKAGE:
                    others = [a.name for a in node.names]
                else:
                    others = list(_plugin_modules_of([node.module], plugin))
            for other in others:
                if other != plugin and other not in allowed:
                    raise PluginImportError(
                        f"{rel} line {node.lineno}: imports plugin {other!r} "
                        f"({ROOT_PACKAGE}.{other}), which PLUGIN_INFO does not require; add "
                        f"'requires': {{{other!r}: '>=...'}} so it loads first and reloads "
                        "with it",
                        rel,
                        node.lineno,
                    )


def check_stray_modules(plugin: str, plugins_root: Path) -> None:
    """Refuse when the plugin's modules use a top-level module living in a plugin folder."""
    root = plugins_root.resolve()
    prefix, raw = str(root), str(plugins_root.absolute())
    base = module_name(plugin)
    stray: dict[str, Path] = {}
    for name, module in modules_snapshot().items():
        if name == ROOT_PACKAGE or name.startswith(ROOT_PACKAGE + "."):
            continue
        file = getattr(module, "__file__", None)
        # a cheap string test first: this runs over every module at every import
        if not isinstance(file, str) or not (file.startswith(prefix) or file.startswith(raw)):
            continue
        try:
            path = Path(file).resolve()
        except (OSError, ValueError):
            continue
        if path.is_relative_to(root):
            stray[name] = path
    if not stray:
        return
    for name, module in modules_snapshot().items():
        if not (name == base or name.startswith(base + ".")):
            continue
        for value in list(vars(module).values()):
            used = None
            if isinstance(value, ModuleType) and value.__name__ in stray:
                used = value.__name__
            else:
                owner = getattr(value, "__module__", None)
                if isinstance(owner, str) and owner in stray:
                    used = owner
            if used is None:
                continue
            path = stray[used]
            folder = path.relative_to(root).parts[0]
            whose = "its own folder" if folder == plugin else f"plugin {folder!r}'s folder"
            rel = name[len(base) + 1 :].replace(".", "/") + ".py" if name != base else "__init__.py"
            raise PluginImportError(
                f"{rel}: the top-level import {used!r} resolves to {path} in {whose} "
                "(through sys.path); plugins import their own modules relatively "
                f"(from . import {used.rsplit('.', 1)[-1]}) and other plugins through "
                f"{ROOT_PACKAGE}.<name> with 'requires'",
                rel,
            )


def _present(folder: Path, name: str) -> bool:
    """Whether the plugin has the file ``name``: refused when it is not a regular file.

    (``Path.is_file`` is False for a FIFO and follows a link: a ``router.py`` FIFO made
    a plugin load without its routes, and nothing said why.)
    """
    try:
        mode = os.lstat(folder / name).st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(mode):
        raise PluginImportError(f"{name} is {kind(mode)}; only regular files are read", name)
    return True


def _config_model(plugin: str, run: ModuleType, folder: Path, base: str) -> type[BaseModel] | None:
    model = getattr(run, "Config", None)
    where = "run.py"
    if model is None and _present(folder, "config.py"):
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
