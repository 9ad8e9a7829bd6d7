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


def test_plugins_compiled_in_several_threads_at_once_never_trip_over_each_other() -> None:
    """CPython 3.11 shares the AST conversions' depth counter between threads: without
    the loader's lock, compiles interleaved by a collection running weakref callbacks
    fail with ``SystemError: AST constructor recursion depth mismatch``."""
    import threading
    import weakref

    source = "\n".join(
        f"def f{i}(a, b):\n    return [x for x in range(a) if x % b]" for i in range(300)
    )
    errors: list[BaseException] = []
    done = threading.Event()

    class Junk:
        pass

    def churn() -> None:  # cyclic garbage whose collection runs Python code
        while not done.is_set():
            junk = Junk()
            junk.self = junk  # type: ignore[attr-defined]
            weakref.finalize(junk, lambda: None)

    def work() -> None:
        for _ in range(30):
            try:
                compile_source(source, "plugin.py")
            except SystemError as exc:
                errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    try:
        threads = [threading.Thread(target=work) for _ in range(3)]
        churner = threading.Thread(target=churn)
        churner.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        done.set()
        churner.join()
        sys.setswitchinterval(interval)
    assert errors == []


def test_an_import_parses_each_plugin_file_once(tmp_path, monkeypatch) -> None:
    """The import check's trees are compiled by the import: no file is parsed twice
    (each parse holds the interpreter, ~20 ms for a 900-line router: issue 8)."""
    import ast
    from collections import Counter
    from pathlib import Path

    from services.loader.importer import import_plugin, purge, restore

    folder = tmp_path / "twice"
    folder.mkdir()
    (folder / "run.py").write_text("PLUGIN_INFO = {'version': '1.0.0'}\nfrom . import util\n")
    (folder / "util.py").write_text("VALUE = 41 + 1\n")
    (folder / "router.py").write_text(
        "from fastapi import APIRouter\nrouter = APIRouter()\n"
        "@router.get('/x')\ndef x():\n    return {}\n"
    )
    parsed: Counter[str] = Counter()
    real = ast.parse

    def counting(source, filename="<unknown>", *args, **kwargs):  # type: ignore[no-untyped-def]
        parsed[Path(filename).name] += 1
        return real(source, filename, *args, **kwargs)

    monkeypatch.setattr(ast, "parse", counting)
    previous = purge("twice")
    try:
        imported = import_plugin("twice", folder, "/app/twice", allowed=set())
    finally:
        restore("twice", previous)
    assert imported.run.util.VALUE == 42
    assert imported.routes == ["GET /app/twice/x"]
    assert parsed == Counter({"run.py": 1, "util.py": 1, "router.py": 1})
