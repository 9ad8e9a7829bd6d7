"""``diff``: what changed in each projection between two positions.

The states are folded in one pass (to the earlier position, copied, then on to the
later one) and compared as JSON-ready data. Each change is a path into the state
(``tasks["hello.cleanup"].failures``) with its value before and after; a list that grew
at its end shows the new items, any other list change shows both lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from replay.timeline import Painter

__all__ = ["Change", "diff_views", "render"]


@dataclass(frozen=True, slots=True)
class Change:
    projection: str
    path: str
    kind: str  # added | removed | changed
    before: Any = None
    after: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "projection": self.projection,
            "path": self.path,
            "kind": self.kind,
            "before": self.before,
            "after": self.after,
        }


def _key(path: str, key: str) -> str:
    if key.isidentifier():
        return f"{path}.{key}" if path else key
    return f"{path}[{orjson.dumps(key).decode()}]"


def _walk(name: str, path: str, a: Any, b: Any, out: list[Change]) -> None:
    if a == b:
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            p = _key(path, str(k))
            if k not in a:
                out.append(Change(name, p, "added", after=b[k]))
            elif k not in b:
                out.append(Change(name, p, "removed", before=a[k]))
            else:
                _walk(name, p, a[k], b[k], out)
        return
    if isinstance(a, list) and isinstance(b, list):
        if len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                _walk(name, f"{path}[{i}]", x, y, out)
            return
        if len(b) > len(a) and b[: len(a)] == a:
            for i in range(len(a), len(b)):
                out.append(Change(name, f"{path}[{i}]", "added", after=b[i]))
            return
    out.append(Change(name, path or "(state)", "changed", a, b))


def diff_views(a: dict[str, Any], b: dict[str, Any]) -> list[Change]:
    """Changes from view ``a`` to view ``b`` (both: projection name -> state)."""
    out: list[Change] = []
    for name in sorted(set(a) | set(b)):
        _walk(name, "", a.get(name, {}), b.get(name, {}), out)
    return out


def _show(value: Any, limit: int = 100) -> str:
    text = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render(changes: list[Change], painter: Painter, a: int, b: int) -> str:
    if not changes:
        return f"no change between positions {a} and {b}"
    lines = [f"changes from position {a} to {b}:"]
    current = None
    for c in changes:
        if c.projection != current:
            current = c.projection
            lines.append(painter.paint(f"{c.projection}:", "1"))
        if c.kind == "added":
            lines.append(painter.paint(f"  + {c.path} = {_show(c.after)}", "32"))
        elif c.kind == "removed":
            lines.append(painter.paint(f"  - {c.path} (was {_show(c.before)})", "31"))
        else:
            lines.append(
                f"  ~ {c.path}: {_show(c.before)} -> {painter.paint(_show(c.after), '33')}"
            )
    return "\n".join(lines)
