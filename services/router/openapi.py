"""OpenAPI merge: each mounted plugin's schema, namespaced, added to ``/openapi.json``.

A plugin's own app documents its routes at their public paths (they are declared there),
so its ``paths`` are taken as they are. Its ``components`` are renamed
``<plugin>.<Name>`` (and every ``$ref`` and security requirement pointing at them
rewritten), so two plugins' ``Item`` models do not collide. FastAPI's own
``HTTPValidationError`` and ``ValidationError`` schemas are the same in every app and
stay shared. Operations without tags get the plugin's name as tag, so Swagger groups
them. The fragment is computed once when a generation is mounted; the kernel merges the
fragments of the mounts being served on every ``/openapi.json`` request.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from typing import Any

__all__ = ["SHARED_SCHEMAS", "merge_fragments", "namespace", "plugin_fragment"]

#: Component schemas every FastAPI app generates identically: never renamed.
SHARED_SCHEMAS = frozenset({"HTTPValidationError", "ValidationError"})

_REF_PREFIX = "#/components/"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


def namespace(plugin: str) -> str:
    """The component name prefix of ``plugin`` (OpenAPI allows ``A-Za-z0-9._-`` only)."""
    return _UNSAFE.sub("_", plugin)


def plugin_fragment(schema: dict[str, Any], plugin: str) -> dict[str, Any]:
    """The ``paths`` and namespaced ``components`` of ``plugin``'s OpenAPI ``schema``."""
    ns = namespace(plugin)
    components: dict[str, dict[str, Any]] = schema.get("components") or {}
    renames: dict[str, str] = {}  # "#/components/schemas/Item" -> "#/components/schemas/p.Item"
    scheme_names: dict[str, str] = {}
    for kind, items in components.items():
        for name in items:
            new = name if kind == "schemas" and name in SHARED_SCHEMAS else f"{ns}.{name}"
            renames[f"{_REF_PREFIX}{kind}/{name}"] = f"{_REF_PREFIX}{kind}/{new}"
            if kind == "securitySchemes":
                scheme_names[name] = new

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            return {key: rewrite(value) for key, value in node.items()}
        if isinstance(node, list):
            return [rewrite(item) for item in node]
        if isinstance(node, str) and node.startswith(_REF_PREFIX):
            return renames.get(node, node)
        return node

    paths: dict[str, Any] = rewrite(copy.deepcopy(schema.get("paths") or {}))
    for item in paths.values():
        for method, operation in item.items():
            if method not in _METHODS or not isinstance(operation, dict):
                continue
            if not operation.get("tags"):
                operation["tags"] = [plugin]
            security = operation.get("security")
            if security and scheme_names:
                operation["security"] = [
                    {scheme_names.get(name, name): scopes for name, scopes in req.items()}
                    for req in security
                ]
    new_components: dict[str, dict[str, Any]] = {}
    for kind, items in components.items():
        renamed = new_components.setdefault(kind, {})
        for name, value in items.items():
            new_ref = renames[f"{_REF_PREFIX}{kind}/{name}"]
            renamed[new_ref.rsplit("/", 1)[1]] = rewrite(value)
    return {"paths": paths, "components": new_components}


def merge_fragments(fragments: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """One ``paths``/``components`` dict out of several plugin fragments."""
    paths: dict[str, Any] = {}
    components: dict[str, dict[str, Any]] = {}
    for fragment in fragments:
        paths.update(fragment.get("paths", {}))
        for kind, items in fragment.get("components", {}).items():
            components.setdefault(kind, {}).update(items)
    return {"paths": paths, "components": components}
