"""The bisect condition language reads state and nothing else."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from replay.errors import ReplayError
from replay.expr import compile_expression

NAMES = ["scheduler.tasks", "loader.plugins", "metrics"]


@dataclass
class Row:
    failures: int = 0
    last: dict[str, str] = field(default_factory=dict)

    def reset(self) -> None:  # a method: conditions may not call it
        self.failures = 0


class Tasks:
    def __init__(self, **rows: Row) -> None:
        self.tasks = dict(rows)
        self._secret = "hidden"


def holds(text: str, position: int = 7, **rows: Row) -> bool:
    state = {
        "scheduler.tasks": Tasks(**rows),
        "loader.plugins": {"rows": {"hello": {"generation": 2}}},
    }
    return compile_expression(text, NAMES).evaluate(state, position)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('tasks.tasks["a.b"].failures > 3', True),
        ('scheduler.tasks.tasks["a.b"].failures >= 5', False),
        ('tasks.tasks["missing"].failures > 3', False),  # missing reads as None
        ('tasks.tasks["missing"].failures == None', True),
        ('plugins.rows.hello.generation == 2 and not tasks.tasks["a.b"].failures < 4', True),
        ("any(t.failures > 3 for t in tasks.tasks.values())", True),
        ("sum(t.failures for t in tasks.tasks.values()) == 4", True),
        ("len(tasks.tasks) == 1", True),
        ('"a.b" in tasks.tasks', True),
        ('tasks.tasks["a.b"].last["outcome"] == "failed"', True),
        ("position >= 7", True),
        ("max(t.failures for t in tasks.tasks.values()) * 2 == 8", True),
        ("-1 < 0", True),
    ],
)
def test_conditions_read_state(text: str, expected: bool) -> None:
    assert holds(text, **{"a.b": Row(failures=4, last={"outcome": "failed"})}) is expected


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("__import__('os').system('true')", "may be called"),
        ("open('/etc/passwd')", "may be called"),
        ("tasks.__class__", "'_'"),
        ("tasks._secret", "'_'"),
        ("tasks.tasks['a.b'].__dict__", "'_'"),
        ("(lambda: 1)()", "may be called"),
        ("lambda: 1", "Lambda"),
        ("[x for x in (1,)]", "ListComp"),
        ("2 ** 10 ** 10", "arithmetic"),
        ("(x := 1)", "NamedExpr"),
        ("tasks.tasks.get('a')", "may be called"),
        ("nonsense > 1", "unknown name"),
        ("f'{tasks}'", "JoinedStr"),
        ("tasks.tasks[1:2]", "slices"),
        ("", "empty"),
        ("1 +", "bad expression"),
        ("x" * 600, "longer"),
        ("(" * 240 + "1" + ")" * 240, "bad expression"),
    ],
)
def test_anything_else_is_refused_before_replaying(text: str, why: str) -> None:
    with pytest.raises(ReplayError, match="expression") as info:
        compile_expression(text, NAMES)
    assert why in str(info.value)


def test_a_method_of_a_state_object_cannot_be_called_or_read() -> None:
    with pytest.raises(ReplayError, match="is a method"):
        holds('tasks.tasks["a.b"].reset', **{"a.b": Row()})


def test_string_repetition_cannot_blow_up_memory() -> None:
    with pytest.raises(ReplayError, match="numbers only"):
        holds(
            'tasks.tasks["a.b"].last["outcome"] * 100000000 == ""',
            **{"a.b": Row(last={"outcome": "x"})},
        )


def test_the_projections_read_are_known_before_folding() -> None:
    e = compile_expression(
        'tasks.tasks["a"].failures > 1 or plugins.rows.x.status == "failed"', NAMES
    )
    assert e.projections == {"scheduler.tasks", "loader.plugins"}
    assert compile_expression("position > 3", NAMES).projections == set()


def _nested(op: str, seed: str, levels: int) -> str:
    inner = seed
    for _ in range(levels):
        inner = f"(a{op}a for a in {inner})"
    return f"max{inner}"


@pytest.mark.parametrize(
    "text",
    [
        # each level squares the number: 2**22 times the digits, hours of CPU
        _nested("*", "[99999999999999999999]", 22) + " > 0",
        # printf formatting builds a string of any size
        'len("%0999999999d" % 1) > 0',
        '"%s" % 1 == "1"',
        # each level doubles the string; then two loops over it multiply
        "any(any(any(0 for c in s) for d in s) for s in ["
        + _nested("+", '["xxxxxxxxxxxxxxxx"]', 16)
        + "])",
    ],
)
def test_conditions_cannot_grow_without_bound(text: str) -> None:
    import anyio

    async def check() -> None:
        with anyio.fail_after(60):
            with pytest.raises(ReplayError, match="grew past|numbers only|steps|items"):
                await anyio.to_thread.run_sync(holds, text)

    anyio.run(check)
