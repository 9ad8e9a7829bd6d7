"""Which projections replay folds, and how their state is shown.

Projections are found, never hard-coded: every installed package lists its projection
classes in the ``xcore.projections`` entry point group (``pyproject.toml``), so replay
shows whatever is installed (the loader's, router's and scheduler's, monitoring's...).
A user's own class is given by import path, ``package.module:Class``.

Event types: replay imports each installed service's ``events`` module (the service's
public contract, which runs no service code) so events decode against their schemas and
upcasters; a type nobody registered (a plugin's own event, or a newer version's) is kept
as raw data and reported, never a crash.

A projection's state is shown through, in order: its ``as_dict()`` if it has one, its
``snapshot()`` (the JSON-ready state it saves) if that is not None, or else its public
attributes, converted generically (dataclasses, deques, sets, tuples).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from collections import deque
from collections.abc import Iterable, Mapping
from importlib.metadata import entry_points
from typing import Any

from kernel.projections import Projection
from replay.errors import ReplayError

__all__ = [
    "discover",
    "import_events",
    "load_class",
    "resolve",
    "to_data",
    "view",
]


def import_events() -> list[str]:
    """Import every installed service's ``events`` module; return the failures, described."""
    failures: list[str] = []
    for ep in entry_points(group="xcore.services"):
        package = ep.value.split(":", 1)[0].rsplit(".", 1)[0]
        name = f"{package}.events"
        try:
            if importlib.util.find_spec(name) is None:
                continue
            importlib.import_module(name)
        except Exception as exc:
            failures.append(f"{name}: {exc!r}")
    return failures


def load_class(path: str) -> type[Projection]:
    """The projection class at ``module:Class`` (or ``module.Class``)."""
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ReplayError(f"projection {path!r}: give it as package.module:Class")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ReplayError(f"projection {path!r}: cannot import {module_name!r}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ReplayError(f"projection {path!r}: {module_name!r} has no {attr!r}")
    if not (isinstance(obj, type) and issubclass(obj, Projection)):
        raise ReplayError(f"projection {path!r} is not a Projection subclass")
    return obj


def discover(warn: list[str] | None = None) -> dict[str, type[Projection]]:
    """The installed projections (``xcore.projections`` entry points), by projection name."""
    found: dict[str, type[Projection]] = {}
    for ep in sorted(entry_points(group="xcore.projections"), key=lambda e: e.name):
        try:
            cls = ep.load()
        except Exception as exc:
            if warn is not None:
                warn.append(f"projection {ep.name!r} ({ep.value}) unavailable: {exc!r}")
            continue
        if isinstance(cls, type) and issubclass(cls, Projection):
            found[cls.name] = cls
        elif warn is not None:
            warn.append(f"projection {ep.name!r} ({ep.value}) is not a Projection subclass")
    return found


def resolve(
    names: Iterable[str] | None, warn: list[str] | None = None
) -> dict[str, type[Projection]]:
    """Projection classes by name: ``names`` (installed names or ``module:Class``), or all."""
    installed = discover(warn)
    if not names:
        return installed
    out: dict[str, type[Projection]] = {}
    for name in names:
        if name in installed:
            out[name] = installed[name]
            continue
        short = [cls for n, cls in installed.items() if n.split(".")[-1] == name]
        if len(short) == 1:
            out[short[0].name] = short[0]
            continue
        if ":" in name or (name.count(".") and name.split(".")[-1][:1].isupper()):
            cls = load_class(name)
            out[cls.name] = cls
            continue
        known = ", ".join(sorted(installed)) or "none installed"
        raise ReplayError(f"unknown projection {name!r} (installed: {known}; or module:Class)")
    return out


def to_data(value: Any, _depth: int = 0) -> Any:
    """``value`` as JSON-ready data (dicts with string keys, lists, scalars)."""
    if _depth > 50:
        return repr(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): to_data(v, _depth + 1) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: to_data(getattr(value, f.name), _depth + 1)
            for f in dataclasses.fields(value)
            if not f.name.startswith("_")
        }
    if isinstance(value, (list, tuple, deque)):
        return [to_data(v, _depth + 1) for v in value]
    if isinstance(value, (set, frozenset)):
        items = [to_data(v, _depth + 1) for v in value]
        try:
            return sorted(items)
        except TypeError:
            return items
    if hasattr(value, "model_dump"):
        return to_data(value.model_dump(mode="json"), _depth + 1)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if hasattr(value, "__dict__"):
        return {
            k: to_data(v, _depth + 1)
            for k, v in vars(value).items()
            if not k.startswith("_") and not callable(v)
        }
    return repr(value)


def view(projection: Projection) -> dict[str, Any]:
    """The state of ``projection`` as JSON-ready data (see the module docstring)."""
    as_dict = getattr(projection, "as_dict", None)
    if callable(as_dict):
        data = as_dict()
    else:
        data = projection.snapshot()
        if data is None:
            data = {
                k: v
                for k, v in vars(projection).items()
                if not k.startswith("_") and k != "position" and not callable(v)
            }
    out = to_data(data)
    return out if isinstance(out, dict) else {"state": out}
