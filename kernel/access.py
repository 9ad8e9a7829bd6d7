"""What a plugin's routes require: the manifest's ``auth`` key, parsed and matched.

``auth`` in ``PLUGIN_INFO`` takes two forms::

    "auth": ["orders:read"]                       # every route needs these scopes
    "auth": {
        "scopes": ["orders:read"],                # the default of every route
        "routes": {
            "POST /app/orders": ["orders:write"], # one method of one route
            "/app/orders/health": [],             # every method; [] = public
        },
    }

A route key is ``[METHOD ]PATH`` where PATH is the route's template as declared
(``/app/orders/{id}``), either the full public path or relative to the plugin's mount
prefix. A request needs *all* the scopes listed for the most specific matching key
(method + path before path alone), else the plugin's default; no scopes means public.
The router's dispatcher enforces it for every plugin (see ``services/router/access.py``);
the loader validates it when it reads the manifest, so a typo stops the load, named.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AuthSpec", "Policy", "parse_auth"]

_SCOPE_RE = re.compile(r"^[A-Za-z0-9_.:*/-]{1,100}$")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_PARAM_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::path)?\}")


@dataclass(frozen=True)
class AuthSpec:
    """The parsed ``auth`` of a manifest."""

    scopes: tuple[str, ...] = ()
    #: ((method or None, path template, scopes), ...)
    routes: tuple[tuple[str | None, str, tuple[str, ...]], ...] = ()

    @property
    def empty(self) -> bool:
        return not self.scopes and not self.routes

    def as_dict(self) -> dict[str, Any]:
        return {
            "scopes": list(self.scopes),
            "routes": {(f"{m} {p}" if m else p): list(s) for m, p, s in self.routes},
        }


def _scopes(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where} must be a scope or a list of scopes")
    bad = [v for v in value if not _SCOPE_RE.match(v)]
    if bad:
        raise ValueError(f"{where}: {bad[0]!r} is not a valid scope (letters, digits, '_.:*/-')")
    return tuple(value)


def parse_auth(value: Any) -> AuthSpec:
    """Validate a manifest's ``auth``; raises ValueError naming the bad part."""
    if value is None:
        return AuthSpec()
    if isinstance(value, (str, list, tuple)):
        return AuthSpec(scopes=_scopes(value, "auth"))
    if not isinstance(value, Mapping):
        raise ValueError("must be a list of scopes or a mapping with 'scopes' and 'routes'")
    unknown = sorted(set(value) - {"scopes", "routes"})
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (known: routes, scopes)")
    scopes = _scopes(value.get("scopes", ()), "auth.scopes")
    routes_value = value.get("routes", {})
    if not isinstance(routes_value, Mapping):
        raise ValueError("auth.routes must map '[METHOD ]/path' to scopes")
    routes: list[tuple[str | None, str, tuple[str, ...]]] = []
    for key, needed in routes_value.items():
        if not isinstance(key, str):
            raise ValueError(f"auth.routes: key {key!r} must be a string")
        verb, _, path = key.strip().rpartition(" ")
        method = verb.strip().upper() or None
        if method is not None and method not in _METHODS:
            raise ValueError(f"auth.routes: {key!r}: unknown method {method!r}")
        if not path.startswith("/"):
            raise ValueError(f"auth.routes: {key!r}: the path must start with '/'")
        routes.append((method, path.rstrip("/") or "/", _scopes(needed, f"auth.routes[{key!r}]")))
    return AuthSpec(scopes=scopes, routes=tuple(routes))


@dataclass(frozen=True)
class Policy:
    """An :class:`AuthSpec` compiled against a mount prefix, ready to answer requests."""

    default: tuple[str, ...]
    #: (method or None, compiled path, scopes), most specific first
    rules: tuple[tuple[str | None, re.Pattern[str], tuple[str, ...]], ...] = field(default=())

    @classmethod
    def compile(cls, spec: AuthSpec, prefix: str) -> Policy:
        rules = []
        for method, path, scopes in spec.routes:
            full = path if path == prefix or path.startswith(prefix + "/") else prefix + path
            pattern = (
                "^"
                + _PARAM_RE.sub(_param, re.escape(full).replace(r"\{", "{").replace(r"\}", "}"))
                + "/?$"
            )
            rules.append((method, re.compile(pattern), scopes))
        rules.sort(key=lambda r: r[0] is None)  # method-specific rules first
        return cls(default=spec.scopes, rules=tuple(rules))

    def required(self, method: str, path: str) -> tuple[str, ...]:
        """The scopes a ``method`` request to ``path`` needs (empty: public)."""
        for rule_method, pattern, scopes in self.rules:
            if (rule_method is None or rule_method == method) and pattern.match(path):
                return scopes
        return self.default


def _param(match: re.Match[str]) -> str:
    return "(.+)" if match.group(0).endswith(":path}") else "([^/]+)"
