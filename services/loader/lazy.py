"""FastAPI's per-field validators of a plugin are built at the end of its import, paced.

Guarantee: a plugin is refused at load, never at a request, when a route of it declares a
type pydantic cannot build a validator for (``PluginLoadFailed`` at boot,
``PluginReloadFailed`` on reload, stage ``import``, naming the route's method and path,
the field and pydantic's message; on reload the old generation keeps serving). Every
validator of a generation is built in its build thread before the generation is
mounted: no request builds one on the event loop. Between two validators the build
thread leaves the loop its share (kernel/pacing.py): pydantic-core's 1-20 ms calls come
one at a time with pauses between them, instead of several inside each route
declaration. Outside a plugin build — the host application's own routes, routes a
plugin declares later (a hook, a request) — FastAPI builds its validators as it always
does (``lazy_validators``, setting of ``services.loader``, on by default).

Mechanism: FastAPI (pydantic v2) wraps every route parameter, body and response model in
a ``ModelField`` whose ``__post_init__`` calls ``TypeAdapter`` at once. While the setting
is on, the name ``TypeAdapter`` that FastAPI's ``ModelField`` calls is :func:`type_adapter`:
inside a build (:func:`deferring`, a context variable the importer sets around the
plugin's import in its thread) it returns a :class:`LazyTypeAdapter` recorded in that
build; anywhere else a real ``TypeAdapter``. Once the plugin's modules are imported,
:func:`complete` builds every recorded adapter (calling :func:`kernel.pacing.pace` after
each), the route's fields first so that a failure names its route and field
(:class:`FieldBuildError`). A lazy adapter still builds itself on its first attribute
read (thread-safe: two first reads may both build; one result is kept), a safety net
for one made in a build that did not complete.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from kernel.pacing import check, pace

__all__ = [
    "Build",
    "FieldBuildError",
    "LazyTypeAdapter",
    "complete",
    "deferring",
    "install",
    "installed",
    "type_adapter",
    "uninstall",
]

_lock = threading.Lock()
_original: Any = None
_holders = 0
#: Real adapters built so far by lazy ones (tests and benchmarks read it).
built = 0


class FieldBuildError(Exception):
    """A route field's validator could not be built (the message names route and field)."""

    def __init__(self, message: str, file: str | None = None, line: int | None = None) -> None:
        super().__init__(message)
        #: Read by the loader to name the file and line of the failure.
        self.plugin_file = file
        self.plugin_line = line


class LazyTypeAdapter:
    """Stands for ``TypeAdapter(*args, **kwargs)``; built by :func:`complete` (or on the
    first attribute read)."""

    __slots__ = ("_args", "_kwargs", "_real")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._args = args
        self._kwargs = kwargs
        self._real: TypeAdapter[Any] | None = None

    def _build(self) -> TypeAdapter[Any]:
        global built
        with warnings.catch_warnings():
            # as FastAPI's ModelField does around the same call (pydantic >= 2.12 warns
            # about field metadata it does not use there)
            try:
                from pydantic.warnings import UnsupportedFieldAttributeWarning
            except ImportError:  # pragma: no cover - older pydantic
                pass
            else:
                warnings.simplefilter("ignore", category=UnsupportedFieldAttributeWarning)
            real = TypeAdapter(*self._args, **self._kwargs)
        self._real = real
        built += 1
        return real

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # copy, pickle, inspection: not the adapter's
            raise AttributeError(name)
        real = self._real
        if real is None:
            real = self._build()
        return getattr(real, name)

    def __repr__(self) -> str:
        state = "built" if self._real is not None else "not built yet"
        return f"<LazyTypeAdapter {state}: {self._args[0]!r}>"


class Build:
    """The lazy adapters made while one plugin generation is imported."""

    def __init__(self) -> None:
        self.adapters: list[LazyTypeAdapter] = []
        #: Set by :func:`complete`: adapters made later are built at once.
        self.closed = False


_current: contextvars.ContextVar[Build | None] = contextvars.ContextVar(
    "xcore_lazy_build", default=None
)


def type_adapter(*args: Any, **kwargs: Any) -> Any:
    """What FastAPI's ``ModelField`` calls while installed: lazy inside a build only."""
    build = _current.get()
    if build is not None:
        check()  # a build the loader gave up on stops here
    if build is None or build.closed:
        return TypeAdapter(*args, **kwargs)  # exactly FastAPI's own
    adapter = LazyTypeAdapter(*args, **kwargs)
    build.adapters.append(adapter)
    return adapter


@contextlib.contextmanager
def deferring() -> Iterator[Build]:
    """Record the adapters FastAPI makes in this thread (context) while the block runs."""
    build = Build()
    token = _current.set(build)
    try:
        yield build
    finally:
        _current.reset(token)


def complete(build: Build, router: Any, root: str, folder: Path | None = None) -> int:
    """Build every adapter of ``build`` (pacing after each); the number built.

    The fields of ``router``'s routes come first, so that a failure raises
    :class:`FieldBuildError` naming the route (``root`` + its path), the field and
    pydantic's message; ``folder`` gives the endpoint's file and line relative to it.
    """
    build.closed = True
    count = 0
    for adapter, site in _sites(build, router, root, folder):
        if adapter._real is not None:
            continue
        try:
            adapter._build()
        except BaseException as exc:  # the plugin's type: even SystemExit is its failure
            if threading.current_thread() is threading.main_thread() and not isinstance(
                exc, Exception
            ):
                raise  # (a real interrupt can only reach the main thread)
            what, file, line = site
            raise FieldBuildError(f"{what}: {type(exc).__name__}: {exc}", file, line) from exc
        count += 1
        pace()
    return count


_Site = tuple[str, str | None, int | None]


def _sites(
    build: Build, router: Any, root: str, folder: Path | None
) -> Iterator[tuple[LazyTypeAdapter, _Site]]:
    seen: set[int] = set()
    for adapter, site in _route_fields(router, root, folder):
        if isinstance(adapter, LazyTypeAdapter) and id(adapter) not in seen:
            seen.add(id(adapter))
            yield adapter, site
    for adapter in build.adapters:
        if id(adapter) not in seen:
            seen.add(id(adapter))
            shown = adapter._args[0] if adapter._args else "?"
            yield adapter, (f"a FastAPI field of type {shown!r} declared by the import", None, None)


def _route_fields(router: Any, root: str, folder: Path | None) -> Iterator[tuple[Any, _Site]]:
    if router is None:
        return
    for route in list(getattr(router, "routes", ()) or ()):
        inner = getattr(route, "original_router", None)  # an included router
        if inner is not None:
            prefix = getattr(getattr(route, "include_context", None), "prefix", "") or ""
            yield from _route_fields(inner, root + prefix, folder)
            continue
        dependant = getattr(route, "dependant", None)
        if dependant is None:
            continue
        methods = ",".join(
            sorted(m for m in (getattr(route, "methods", None) or ["WS"]) if m != "HEAD")
        )
        where = f"{methods} {root}{getattr(route, 'path', '')}"
        file, line = _endpoint_at(getattr(route, "endpoint", None), folder)
        for kind, field in _fields(route, dependant):
            adapter = getattr(field, "_type_adapter", None)
            name = getattr(field, "name", "?")
            yield adapter, (f"{where}: field {name!r} ({kind})", file, line)


def _fields(route: Any, dependant: Any) -> Iterator[tuple[str, Any]]:
    stack, visited = [dependant], set()
    while stack:
        dep = stack.pop()
        if id(dep) in visited:
            continue
        visited.add(id(dep))
        for attr in (
            "path_params",
            "query_params",
            "header_params",
            "cookie_params",
            "body_params",
        ):
            for field in getattr(dep, attr, ()) or ():
                info = getattr(field, "field_info", None)
                yield type(info).__name__.lower() if info is not None else attr, field
        stack.extend(getattr(dep, "dependencies", ()) or ())
    body = getattr(route, "body_field", None)
    if body is not None:
        yield "body", body
    response = getattr(route, "response_field", None)
    if response is not None:
        yield "response model", response
    for code, field in (getattr(route, "response_fields", None) or {}).items():
        yield f"response {code} model", field
    item = getattr(route, "stream_item_field", None)
    if item is not None:
        yield "stream item", item


def _endpoint_at(endpoint: Any, folder: Path | None) -> tuple[str | None, int | None]:
    code = getattr(endpoint, "__code__", None)
    if code is None or folder is None:
        return None, None
    try:
        rel = Path(code.co_filename).resolve().relative_to(folder.resolve())
    except (ValueError, OSError):
        return None, None
    return rel.as_posix(), code.co_firstlineno


def _module() -> Any:
    from fastapi._compat import v2

    return v2


def installed() -> bool:
    try:
        return _module().TypeAdapter is type_adapter
    except (ImportError, AttributeError):
        return False


def install() -> bool:
    """Make FastAPI's ModelField defer its adapters inside plugin builds (idempotent);
    False if this FastAPI has no such hook (then nothing changes)."""
    global _original, _holders
    with _lock:
        try:
            v2 = _module()
        except ImportError:
            return False
        current = getattr(v2, "TypeAdapter", None)
        if current is type_adapter:
            _holders += 1
            return True
        if current is not TypeAdapter:  # an unknown FastAPI layout: leave it alone
            return False
        _original = current
        _holders = 1
        v2.TypeAdapter = type_adapter
        return True


def uninstall() -> None:
    """The last holder puts FastAPI's own ``TypeAdapter`` back."""
    global _original, _holders
    with _lock:
        _holders = max(_holders - 1, 0)
        if _holders == 0 and _original is not None:
            _module().TypeAdapter = _original
            _original = None
