"""The loader's line in memory (services/loader/line.py) against a plain list model.

Every answer of the line (place, length, the reload a new one joins, a page after a
request) is compared with the answer computed by walking a list after each step of
random sequences of joins (in log order, some twice, some already taken) and takes.
"""

from __future__ import annotations

import random

from kernel.events import Meta, Recorded
from services.loader.line import COMPACT_AT, Line


def rec(position: int, name: str) -> Recorded:
    return Recorded(
        position=position,
        stream=f"plugin-{name}",
        version=1,
        type="PluginReloadRequested",
        schema=1,
        data={"name": name},
        meta=Meta(actor="admin"),
        timestamp=0.0,
    )


def check(line: Line, model: list[Recorded]) -> None:
    assert len(line) == len(model)
    assert [r.position for r in line.waiting()] == [r.position for r in model]
    for place, r in enumerate(model, start=1):
        assert line.place(r.position) == place
        assert r.position in line
    for name in ("a", "b", "c"):
        first = next((r for r in model if r.data["name"] == name), None)
        assert line.reload_of(name) is first
    positions = [r.position for r in model]
    for after in [0, *positions[:3], *(p + 1 for p in positions[-3:])]:
        want = [(i + 1, r) for i, r in enumerate(model) if r.position > after][:7]
        assert line.page(after, 7) == want


def test_the_line_matches_a_walked_list_through_random_joins_and_takes() -> None:
    rng = random.Random(8)
    for _ in range(20):
        line = Line(taken=5)
        model: list[Recorded] = []
        position = 5
        taken = 5
        for _ in range(400):
            if rng.random() < 0.6:
                position += rng.randint(1, 3)
                r = rec(position, rng.choice("abc"))
                assert line.join(r, r.data["name"]) == (position > taken)
                if position > taken:
                    model.append(r)
                assert not line.join(r, r.data["name"])  # delivered twice: once in line
            elif rng.random() < 0.2:
                # the loader took a request before the line saw it: it never joins
                position += 1
                taken = position
                line.take(position)
                model.clear()
                r = rec(position, "a")
                assert not line.join(r, "a")
            elif model:
                k = rng.randint(0, len(model) - 1)
                taken = model[k].position
                line.take(taken)
                del model[: k + 1]
            check(line, model)
        assert line.place(1) is None and 1 not in line


def test_compaction_keeps_places_and_pages() -> None:
    line = Line()
    n = COMPACT_AT * 3
    records = [rec(p, "a" if p % 2 else "b") for p in range(1, n + 1)]
    for r in records:
        line.join(r, r.data["name"])
    for cut in range(1, n, 97):
        line.take(cut)
        model = [r for r in records if r.position > cut]
        assert len(line) == len(model)
        assert line.place(model[0].position) == 1 and line.place(model[-1].position) == len(model)
        assert line.page(model[-2].position, 5) == [(len(model), model[-1])]
        assert line.reload_of("a") is next(r for r in model if r.data["name"] == "a")
    assert len(line._items) < n  # the taken head was dropped


def test_a_page_past_the_end_or_of_nothing_is_empty() -> None:
    line = Line()
    assert line.page(0, 10) == [] and len(line) == 0
    line.join(rec(3, "a"))
    assert line.page(3, 10) == [] and line.page(2**62, 1) == []
    assert line.page(0, 10) == [(1, line.waiting()[0])]
    assert line.reload_of("a") is None  # joined without a name: nothing joins it
    line.see(10)
    assert not line.join(rec(9, "a"))  # seen already (not a request of this node)


def test_a_reload_is_not_joined_across_another_request_of_its_plugin() -> None:
    """reload a, uninstall a, reload a: the second reload runs after the uninstall (it
    must not join the first, which runs before it and would report a success)."""
    line = Line()
    first = rec(1, "a")
    line.join(first, "a")
    uninstall = Recorded(
        position=2,
        stream="plugin-a",
        version=2,
        type="PluginUninstallRequested",
        schema=1,
        data={"name": "a"},
        meta=Meta(actor="admin"),
        timestamp=0.0,
    )
    line.join(uninstall)
    assert line.reload_of("a") is None
    second = rec(3, "a")
    line.join(second, "a")
    assert line.reload_of("a") is second
    line.take(1)
    assert line.reload_of("a") is second and line.place(3) == 2
    line.take(3)
    assert line.reload_of("a") is None and len(line) == 0
