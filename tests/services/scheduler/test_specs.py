"""Validation of task declarations: each refusal names the reason."""

from __future__ import annotations

import pytest

from services.scheduler.specs import TaskDeclarationError, check_dependencies, compile_spec

from .helpers import spec


def noop() -> None:
    pass


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cron": "99 * * * *"}, "not a valid cron expression"),
        ({"cron": "*/5 * * * *", "tz": "Nowhere/City"}, "unknown time zone 'Nowhere/City'"),
        ({"every": "5s", "cron": "* * * * *"}, "give one trigger"),
        ({}, "no trigger"),
        ({"every": "fast"}, "every: 'fast' is not a duration"),
        ({"every": "5s", "misfire": "later"}, "misfire must be"),
        ({"every": "5s", "max_instances": 0}, "max_instances"),
        ({"every": "5s", "retries": -1}, "retries"),
        ({"after": "1s", "jitter": "1s"}, "jitter applies to recurring"),
        ({"every": "5s", "depends_on": "noop"}, "cannot depend on itself"),
    ],
)
def test_bad_declarations_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(TaskDeclarationError, match=message):
        compile_spec("p", spec(noop, **options))


def test_good_declaration() -> None:
    task = compile_spec("hello", spec(noop, every="30s", jitter="2s", depends_on=["other.x"]))
    assert task.id == "hello.noop"
    assert task.jitter == 2.0
    assert task.depends_on == ("other.x",)
    assert task.trigger is not None and task.trigger.description == "every 30s"
    assert not task.is_async


def test_dependency_checks() -> None:
    a = compile_spec("p", spec(noop, name="a", every="1s", depends_on="b"))
    b = compile_spec("p", spec(noop, name="b", every="1s", depends_on="a"))
    c = compile_spec("p", spec(noop, name="c", every="1s", depends_on="a"))
    d = compile_spec("p", spec(noop, name="d", every="1s", depends_on="q.unknown"))
    e = compile_spec("p", spec(noop, name="e", every="1s", depends_on="other.x"))
    refused = check_dependencies({t.id: t for t in (a, b, c, d, e)}, existing={}, known=["other.x"])
    assert refused["p.a"].startswith("dependency cycle: p.a -> p.b -> p.a")
    assert refused["p.b"].startswith("dependency cycle")
    assert refused["p.c"] == "depends on refused task(s) p.a"
    assert refused["p.d"] == "depends on unknown task(s) q.unknown"
    assert "p.e" not in refused


def test_cycle_across_plugins() -> None:
    a = compile_spec("p", spec(noop, name="a", every="1s", depends_on="q.b"))
    refused = check_dependencies({a.id: a}, existing={"q.b": ("p.a",)}, known=[])
    assert "dependency cycle" in refused["p.a"]


def test_a_clusters_declaration_is_compiled_on_the_grid_it_runs_on() -> None:
    """A plain interval without a start counts from the registration on one node and
    runs on the shared grid in a cluster (the combinations: the test below)."""
    alone = compile_spec("p", spec(noop, every="10s"))
    plain = compile_spec("p", spec(noop, every="10s"), grid=True)
    assert alone.trigger is not None and plain.trigger is not None
    assert alone.trigger.first(1000.5) == 1010.5
    assert plain.trigger.first(1000.5) == 1010.0
    # it reads as declared either way
    assert plain.trigger_description == alone.trigger_description == "every 10s"


@pytest.mark.parametrize("grid", [False, True])
def test_an_any_or_all_of_intervals_runs_on_the_grid_on_one_node_too(grid: bool) -> None:
    """A due time carries one phase: parts counted from the registration could not be
    followed together (an ``any`` of 10 s and 15 s ran every 10 s only, an ``all`` of
    intervals was refused as never firing). Combined, they run on the grid everywhere,
    and the checks look at those due times."""
    both = compile_spec(
        "p", spec(noop, trigger={"all": [{"every": "10s"}, {"every": "15s"}]}), grid=grid
    )
    assert both.trigger is not None
    assert both.trigger.first(1000.5) == 1020.0
    assert both.trigger.next_after(1020.0) == 1050.0
    union = {"any": [{"every": "10s"}, {"every": "15s"}]}
    either = compile_spec("p", spec(noop, trigger=union), grid=grid)
    assert either.trigger is not None
    dues = [either.trigger.first(1000.5)]
    for _ in range(5):
        nxt = either.trigger.next_after(dues[-1])
        assert nxt is not None
        dues.append(nxt)
    assert dues == [1005.0, 1010.0, 1020.0, 1030.0, 1035.0, 1040.0]
    # 5 s gaps: a jitter of 8 s would let a run overtake the next one
    with pytest.raises(TaskDeclarationError, match=r"jitter \(8s\) must be below .* \(5s\)"):
        compile_spec("p", spec(noop, trigger=union, jitter="8s"), grid=grid)
