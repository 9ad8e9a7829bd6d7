"""Load order from ``requires``: dependencies first; missing, mismatched and cyclic refused."""

from __future__ import annotations

from services.loader.deps import load_order
from services.loader.manifest import Manifest, parse_manifest


def m(name: str, version: str = "1.0.0", requires: object = None) -> Manifest:
    info: dict[str, object] = {"version": version}
    if requires is not None:
        info["requires"] = requires
    return parse_manifest(info, name)


def test_dependencies_come_first() -> None:
    order, refused = load_order(
        {
            "a": m("a", requires={"b": ">=1"}),
            "b": m("b", requires=["c"]),
            "c": m("c"),
            "d": m("d"),
        }
    )
    assert refused == {}
    assert order.index("c") < order.index("b") < order.index("a")
    assert set(order) == {"a", "b", "c", "d"}


def test_missing_and_wrong_version_and_propagation() -> None:
    order, refused = load_order(
        {
            "a": m("a", requires={"ghost": ">=1"}),
            "b": m("b", requires={"c": ">=2"}),
            "c": m("c", "1.5.0"),
            "d": m("d", requires=["b"]),
        }
    )
    assert order == ["c"]
    assert "ghost>=1, which is not installed" in refused["a"]
    assert "but c 1.5.0 is installed" in refused["b"]
    assert "requires b, which cannot be loaded" in refused["d"]


def test_cycle_is_named() -> None:
    order, refused = load_order(
        {"a": m("a", requires=["b"]), "b": m("b", requires=["a"]), "c": m("c")}
    )
    assert order == ["c"]
    assert refused["a"].startswith("dependency cycle: ")
    assert "a -> b -> a" in refused["a"] or "b -> a -> b" in refused["a"]
    assert "cycle" in refused["b"]
