"""The loader's nesting bound on plugin source holds whatever the recursion limit."""

from __future__ import annotations

import sys

import pytest

from services.loader.source import MAX_NESTING, SourceTooDeep, compile_source, nesting, parse_source


def _chain(terms: int) -> str:
    return "X = " + "+".join(["1"] * terms) + "\n"


def test_a_deep_file_is_refused_with_its_line_even_with_a_raised_recursion_limit() -> None:
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(100_000)
    try:
        with pytest.raises(SourceTooDeep, match=r"line 2: nested more than 1000 levels"):
            compile_source("import os\n" + _chain(5_000), "deep.py")
    finally:
        sys.setrecursionlimit(limit)


def test_code_below_the_bound_compiles_and_runs() -> None:
    scope: dict[str, object] = {}
    exec(compile_source(_chain(MAX_NESTING // 2), "ok.py"), scope)
    assert scope["X"] == MAX_NESTING // 2


def test_the_depth_is_measured_without_recursion() -> None:
    tree = parse_source(_chain(10), "ten.py")
    depth, line = nesting(tree)
    # Module > Assign > BinOp x9 > Constant
    assert (depth, line) == (12, 1)


def test_syntax_errors_and_null_bytes_keep_their_own_errors() -> None:
    with pytest.raises(SyntaxError):
        parse_source("def (:\n", "bad.py")
    with pytest.raises((SyntaxError, ValueError), match="null bytes"):
        parse_source(b"X = 1\0\n", "nul.py")
