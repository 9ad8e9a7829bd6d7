"""Plugin dependencies (``requires``): load order, and whether a requirement is met."""

from __future__ import annotations

from collections.abc import Mapping

from .manifest import Manifest

__all__ = ["load_order"]


def load_order(manifests: Mapping[str, Manifest]) -> tuple[list[str], dict[str, str]]:
    """The names in an order where each plugin comes after the ones it requires.

    Returns ``(order, refused)``: ``refused`` maps a plugin to why it cannot be loaded
    (a missing plugin, a version that does not match, a cycle, or a refused
    requirement). Plugins outside a problem keep their place; ties sort by name.
    """
    refused: dict[str, str] = {}
    for name, m in manifests.items():
        for req in m.requires:
            other = manifests.get(req.name)
            if other is None:
                refused[name] = f"requires {req}, which is not installed (or is disabled)"
                break
            if not req.allows(other.version):
                refused[name] = f"requires {req}, but {req.name} {other.version} is installed"
                break
    order: list[str] = []
    state: dict[str, int] = {}  # 1: visiting, 2: done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = [*path[path.index(name) :], name]
            for member in cycle[:-1]:
                refused.setdefault(member, f"dependency cycle: {' -> '.join(cycle)}")
            return
        state[name] = 1
        for req in sorted(manifests[name].requires, key=lambda r: r.name):
            if req.name in manifests:
                visit(req.name, [*path, name])
        state[name] = 2
        order.append(name)

    for name in sorted(manifests):
        visit(name, [])
    # a plugin whose requirement is refused is refused too (in order, so chains propagate)
    for name in order:
        if name in refused:
            continue
        for req in manifests[name].requires:
            if req.name in refused:
                refused[name] = f"requires {req.name}, which cannot be loaded"
                break
    return [n for n in order if n not in refused], refused
