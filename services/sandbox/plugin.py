"""The plugin as the sandbox worker sees it: imported, configured, described.

Runs inside the worker only. The plugin's folder is imported as the package
``xcore_plugins.<name>`` by a small meta-path finder, every file compiled from its source
(never from a bytecode cache); then ``config.yaml`` is validated against its ``Config``
model, its router is put in a FastAPI app of its own (under the mount point the kernel's
prefix rules give), and its routes, OpenAPI schema, tasks and hooks are described for the
``ready`` frame. Every failure is a :class:`Failed` naming the loader's stage and the
culprit (file and line when the plugin's own code raised).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import inspect
import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["PACKAGE", "Context", "Failed", "Plugin"]

PACKAGE = "xcore_plugins"


class Failed(Exception):
    """Starting the plugin failed at ``stage`` (the loader's stage names)."""

    def __init__(self, stage: str, message: str, tb: str = "") -> None:
        super().__init__(message)
        self.stage, self.message, self.tb = stage, message, tb


class _Source(importlib.abc.Loader):
    """Runs a plugin file compiled from its source (never from a bytecode cache)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        if self.path is not None:
            code = compile(self.path.read_bytes(), str(self.path), "exec", dont_inherit=True)
            exec(code, module.__dict__)


class _Finder(importlib.abc.MetaPathFinder):
    """``xcore_plugins.<name>[.sub]`` -> the files of the plugin's folder."""

    def __init__(self, name: str, root: Path) -> None:
        self.name, self.root = name, root

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        parts = fullname.split(".")
        if len(parts) < 2 or parts[0] != PACKAGE or parts[1] != self.name:
            return None
        base = self.root.joinpath(*parts[2:])
        if len(parts) == 2 or base.is_dir():
            init = base / "__init__.py"
            if len(parts) > 2 and not init.is_file():
                return None
            has = init.is_file()
            spec = importlib.machinery.ModuleSpec(
                fullname,
                _Source(init if has else None),
                origin=str(init if has else base),
                is_package=True,
            )
            spec.submodule_search_locations = [str(base)]
            spec.has_location = has
            return spec
        file = base.with_name(base.name + ".py")
        if not file.is_file():
            return None
        spec = importlib.machinery.ModuleSpec(fullname, _Source(file), origin=str(file))
        spec.has_location = True
        return spec


def _culprit(exc: BaseException, root: Path) -> str:
    where = ""
    if isinstance(exc, SyntaxError) and exc.filename:
        with contextlib.suppress(ValueError):
            rel = Path(exc.filename).resolve().relative_to(root.resolve())
            return f"{rel.as_posix()} line {exc.lineno}: "
    for frame in traceback.extract_tb(exc.__traceback__):
        with contextlib.suppress(ValueError):
            rel = Path(frame.filename).resolve().relative_to(root.resolve())
            where = f"{rel.as_posix()} line {frame.lineno}: "
    return where


class Context:
    """The sandboxed plugin's :class:`kernel.sdk.PluginContext`.

    ``append`` and ``subscribe`` travel to the kernel (``link``: the worker's server),
    which checks them (:mod:`services.sandbox.bridge`): its own streams and event types.
    """

    def __init__(self, name: str, config: Any, data_dir: Path, link: Any = None) -> None:
        self.name = name
        self.config = config
        self.logger = logging.getLogger(f"xcore.plugin.{name}")
        self.data_dir = data_dir
        self._link = link

    async def append(self, event: Any, *, stream: str | None = None) -> list[Any]:
        """Record ``event`` (default stream ``plugin-<name>``); returns once durable.

        Raises ``PermissionError`` for what a sandboxed plugin may not append (another
        plugin's stream, the kernel's event types)."""
        from kernel.events import Event

        if not isinstance(event, Event):
            raise TypeError(f"ctx.append takes an Event, not {type(event).__name__}")
        if self._link is None:
            raise RuntimeError(f"plugin {self.name!r}: no kernel to append to")
        return list(await self._link.append(event, stream))

    async def subscribe(self, handler: Any, *, types: Any = None) -> None:
        """Receive new events live (the types named, or all the sandbox lets it see)."""
        if not callable(handler):
            raise TypeError("ctx.subscribe needs a callable handler")
        if isinstance(types, str):
            raise TypeError(f"types must be a collection of event types, not the string {types!r}")
        names = None
        if types is not None:
            names = [t if isinstance(t, str) else t.type_name for t in types]
        if self._link is None:
            raise RuntimeError(f"plugin {self.name!r}: no kernel to subscribe to")
        await self._link.subscribe(handler, names)


class Plugin:
    """The imported plugin: its app, tasks, hooks and context."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.name: str = cfg["name"]
        self.root = Path(cfg["folder"])
        self.cfg = cfg
        self.app: Any = None
        self.tasks: dict[str, Any] = {}
        self.hooks: dict[str, Any] = {}
        self.ctx: Context | None = None
        #: Carries ``ctx.append`` / ``ctx.subscribe`` to the kernel (the worker's server).
        self.link: Any = None

    def load(self) -> dict[str, Any]:
        """Import and describe the plugin (raises :class:`Failed`)."""
        from fastapi import APIRouter, FastAPI
        from pydantic import BaseModel, ValidationError
        from starlette.routing import WebSocketRoute

        from kernel import validation
        from kernel.prefixes import PrefixError, mount_point
        from kernel.sdk import TaskSpec

        name, root = self.name, self.root
        sys.meta_path.insert(0, _Finder(name, root))
        pkg = ModuleType(PACKAGE)
        pkg.__path__ = []
        sys.modules[PACKAGE] = pkg
        base = f"{PACKAGE}.{name}"
        try:
            importlib.import_module(base)
            run = importlib.import_module(base + ".run")
            router_mod = (
                importlib.import_module(base + ".router")
                if (root / "router.py").is_file()
                else None
            )
            model = getattr(run, "Config", None)
            where = "run.py"
            if model is None and (root / "config.py").is_file():
                model = getattr(importlib.import_module(base + ".config"), "Config", None)
                where = "config.py"
        except MemoryError:
            raise
        except BaseException as exc:
            raise Failed(
                "import",
                f"plugin {name!r}: {_culprit(exc, root)}{type(exc).__name__}: {exc}",
                "".join(traceback.format_exception(exc)),
            ) from None
        config: Any = self.cfg.get("config") or {}
        if model is not None:
            if not (inspect.isclass(model) and issubclass(model, BaseModel)):
                raise Failed(
                    "import",
                    f"plugin {name!r}: {where}: `Config` must be a pydantic BaseModel subclass",
                )
            try:
                config = model.model_validate(config)
            except ValidationError as exc:
                parts = []
                for err in exc.errors():
                    key = ".".join(str(p) for p in err["loc"]) or "(root)"
                    msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
                    parts.append(f"key {key!r}: {msg}")
                raise Failed(
                    "config", f"plugin {name!r}: config.yaml: " + "; ".join(parts)
                ) from None
        self.ctx = Context(name, config, Path(self.cfg["data_dir"]), self.link)
        prefix, openapi = None, None
        routes: list[str] = []
        if router_mod is not None:
            raw = getattr(router_mod, "router", None)
            if not isinstance(raw, APIRouter):
                what = "no `router`" if raw is None else f"`router` as a {type(raw).__name__}"
                raise Failed(
                    "import", f"plugin {name!r}: router.py defines {what}, not an APIRouter"
                )
            if raw.routes:
                try:
                    point = mount_point(self.cfg.get("prefix"), raw.prefix)
                except PrefixError as exc:
                    raise Failed("import", f"plugin {name!r}: router.py: {exc}") from None
                sockets = [
                    getattr(r, "path", "?") for r in raw.routes if isinstance(r, WebSocketRoute)
                ]
                sockets += [
                    getattr(r, "path", "?")
                    for r in raw.routes
                    if type(r).__name__ == "APIWebSocketRoute"
                ]
                if sockets:
                    raise Failed(
                        "import",
                        f"plugin {name!r}: router.py: websocket route(s) {', '.join(sockets)} cannot "
                        "be served sandboxed (the sandbox proxies HTTP only); run the plugin "
                        "trusted or drop them",
                    )
                app = FastAPI(
                    title=name, version=self.cfg.get("version", "0"), docs_url=None, redoc_url=None
                )
                app.include_router(raw, prefix=point.root)
                # refusals as in the kernel's app: a JSON 422 whatever the input (NaN...)
                validation.install(app)
                self.app = app
                prefix = point.prefix
                for route in raw.routes:
                    path = getattr(route, "path", None)
                    if path is None:
                        continue
                    methods = sorted(getattr(route, "methods", None) or [])
                    routes.extend(f"{m} {point.root}{path}" for m in methods if m != "HEAD")
                openapi = app.openapi()
                app.openapi_url = None
        tasks = []
        for value in vars(run).values():
            spec = getattr(value, "__xcore_task__", None)
            if isinstance(spec, TaskSpec):
                self.tasks[spec.name] = spec.fn
                described = {k: v for k, v in vars(spec).items() if k != "fn"}
                tasks.append(described)
        for hook in ("on_load", "on_unload"):
            fn = getattr(run, hook, None)
            if fn is not None:
                if not callable(fn):
                    raise Failed("import", f"plugin {name!r}: run.py: `{hook}` is not callable")
                self.hooks[hook] = fn
        return {"prefix": prefix, "routes": sorted(routes), "openapi": openapi, "tasks": tasks}
