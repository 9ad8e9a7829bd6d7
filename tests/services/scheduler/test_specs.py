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


def test_a_clusters_declaration_is_checked_on_the_grid_it_runs_on() -> None:
    """In a cluster the intervals without a start run on the shared grid: the checks
    look at those due times, not the ones counted from the registration."""
    both = {"trigger": {"all": [{"every": "10s"}, {"every": "15s"}]}}
    # counted from the registration the parts never meet; on the grid, every 30 s
    with pytest.raises(TaskDeclarationError, match="never fires"):
        compile_spec("p", spec(noop, **both))
    task = compile_spec("p", spec(noop, **both), grid=True)
    assert task.trigger is not None
    first = task.trigger.first(1000.5)
    assert first == 1020.0
    assert task.trigger.next_after(first) == 1050.0
    # on the grid an `any` of 10 s and 15 s is due at :00, :10, :15, :20, :30: 5 s gaps
    either = {"trigger": {"any": [{"every": "10s"}, {"every": "15s"}]}, "jitter": "8s"}
    compile_spec("p", spec(noop, **either))
    with pytest.raises(TaskDeclarationError, match=r"jitter \(8s\) must be below .* \(5s\)"):
        compile_spec("p", spec(noop, **either), grid=True)
    # a plain interval reads as declared either way
    plain = compile_spec("p", spec(noop, every="10s"), grid=True)
    assert plain.trigger_description == "every 10s"
