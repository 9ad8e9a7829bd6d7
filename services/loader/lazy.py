"""FastAPI's per-field validators are built on first use, not while a plugin is imported.

Guarantee: importing a plugin with many routes no longer runs one long pydantic-core call
per route parameter while other plugins serve requests: with ``lazy_validators`` (setting
of ``services.loader``, on by default), declaring a route builds none of its fields'
validators and serializers; each is built the first time it is used (the route's first
request, or the OpenAPI document) and kept. Requests are validated and answered exactly as
before (same errors, same output): only *when* the work is done changes.

Mechanism: FastAPI (pydantic v2) wraps every route parameter, body and response model in
a ``ModelField`` whose ``__post_init__`` builds a ``pydantic.TypeAdapter`` at once — for a
300-route plugin 1,200 of them, ~0.9 s of C calls of 1-20 ms, each holding the
interpreter so the event loop waits (a neighbour's request waits as long). While the
setting is on, the name ``TypeAdapter`` that FastAPI's ``ModelField`` calls is a
:class:`LazyTypeAdapter`: it keeps the arguments and builds the real adapter on the first
attribute read (thread-safe: two first reads may both build; one result is kept).

Trade-off: a type pydantic cannot build a schema for (an arbitrary class as a body) is
no longer refused while the plugin is imported, but at the first request of that route
(a 500 answer and the exception in the log) and by ``/openapi.json``. Set ``lazy_validators:
false`` to have such plugins refused at load.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any

from pydantic import TypeAdapter

__all__ = ["LazyTypeAdapter", "install", "installed", "uninstall"]

_lock = threading.Lock()
_original: Any = None
_holders = 0
#: Real adapters built so far by lazy ones (tests and benchmarks read it).
built = 0


class LazyTypeAdapter:
    """Stands for ``TypeAdapter(*args, **kwargs)``; builds it on the first attribute read."""

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


def _module() -> Any:
    from fastapi._compat import v2

    return v2


def installed() -> bool:
    try:
        return _module().TypeAdapter is LazyTypeAdapter
    except (ImportError, AttributeError):
        return False


def install() -> bool:
    """Make FastAPI's ModelField build its adapters lazily (idempotent); False if this
    FastAPI has no such hook (then nothing changes)."""
    global _original, _holders
    with _lock:
        try:
            v2 = _module()
        except ImportError:
            return False
        current = getattr(v2, "TypeAdapter", None)
        if current is LazyTypeAdapter:
            _holders += 1
            return True
        if current is not TypeAdapter:  # an unknown FastAPI layout: leave it alone
            return False
        _original = current
        _holders = 1
        v2.TypeAdapter = LazyTypeAdapter
        return True


def uninstall() -> None:
    """The last holder puts FastAPI's own ``TypeAdapter`` back (adapters already made
    stay lazy)."""
    global _original, _holders
    with _lock:
        _holders = max(_holders - 1, 0)
        if _holders == 0 and _original is not None:
            _module().TypeAdapter = _original
            _original = None
