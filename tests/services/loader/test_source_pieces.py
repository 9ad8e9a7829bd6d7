"""Long plugin files are parsed and compiled in pieces, with the event loop served between
two (services/loader/source.py), and mean exactly what they mean parsed at once: the same
tree, the same module once run, the same errors."""

from __future__ import annotations

import ast
import inspect
import textwrap
import typing
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import pytest

from services.loader import source
from services.loader.source import PIECE_LINES, compile_pieces, compile_tree, parse_checked


def _long(body: str, repeat: int) -> str:
    return "".join(body.format(i=i) for i in range(repeat))


#: Lines at column 0 that may not start a piece: inside brackets and strings, after a
#: decorator or a backslash, an ``else``; a string statement; ``__future__`` flags.
HOSTILE = '"""The module\'s docstring."""\nfrom __future__ import annotations\nimport os\n' + _long(
    "x{i}: list[int] = [\n"
    "1,\n"
    "2]\n"
    "s{i} = '''\n"
    "def not_code_{i}():\n"
    "    pass\n"
    "'''\n"
    "@staticmethod\n"
    "def f{i}(a: Undefined) -> Undefined:\n"
    "    return a\n"
    "if x{i}:\n"
    "    y{i} = 1\n"
    "else:\n"
    "    y{i} = 2\n"
    "z{i} = 1 + \\\n"
    "2\n"
    '"a string statement, not a docstring {i}"\n'
    "try:\n"
    "    pass\n"
    "finally:\n"
    "    pass\n",
    60,
)


def test_a_long_file_is_parsed_in_pieces_into_the_tree_ast_parse_builds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    paces: list[int] = []
    monkeypatch.setattr(source, "pace", lambda: paces.append(1))
    files = [HOSTILE, Path(inspect.getfile(typing)).read_text(), Path(ast.__file__).read_text()]
    for text in files:
        before = len(paces)
        tree = parse_checked(text.encode(), "long.py").tree
        assert ast.dump(tree, include_attributes=True) == ast.dump(
            ast.parse(text.encode(), "long.py"), include_attributes=True
        )
        # the loop was served between pieces (parsed at once: no pause)
        assert text.count("\n") > 1000 and len(paces) - before >= 5


@pytest.mark.parametrize(
    "encoded",
    [
        HOSTILE.replace("\n", "\r\n").encode(),  # Windows line ends
        b"\xef\xbb\xbf" + HOSTILE.encode(),  # a byte-order mark
        ("# -*- coding: latin-1 -*-\n" + HOSTILE.replace("not_code", "caf\u00e9")).encode(
            "latin-1"
        ),
        HOSTILE.replace("    ", "\t").encode(),  # tabs
    ],
    ids=["crlf", "bom", "latin-1", "tabs"],
)
def test_odd_encodings_and_line_ends_parse_in_pieces_to_the_same_tree(encoded: bytes) -> None:
    tree = parse_checked(encoded, "odd.py").tree
    assert ast.dump(tree, include_attributes=True) == ast.dump(
        ast.parse(encoded, "odd.py"), include_attributes=True
    )


def test_a_long_module_runs_in_pieces_as_it_runs_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    paces: list[int] = []
    monkeypatch.setattr(source, "pace", lambda: paces.append(1))
    tree = parse_checked(HOSTILE, "hostile.py").tree
    codes = compile_pieces(tree, "hostile.py")
    assert len(codes) > 5 and len(paces) >= len(codes) - 1 + 5
    pieces, whole = ModuleType("plugin"), ModuleType("plugin")
    for code in codes:
        exec(code, pieces.__dict__)
    exec(compile_tree(tree, "hostile.py"), whole.__dict__)

    def seen(module: ModuleType) -> dict[str, Any]:
        names = {k: v for k, v in vars(module).items() if k != "__builtins__"}
        functions = {k: v.__annotations__ for k, v in names.items() if callable(v)}
        values = {k: v for k, v in names.items() if not callable(v) and k != "os"}
        return {"functions": functions, "values": values}

    assert seen(pieces) == seen(whole)
    # the docstring is the module's first statement only; annotations stay strings
    assert pieces.__doc__ == "The module's docstring."
    assert pieces.__annotations__["x59"] == "list[int]"
    assert pieces.f3.__annotations__ == {"a": "Undefined", "return": "Undefined"}


@pytest.mark.parametrize(
    ("bad", "line"),
    [
        ("x = (\n", None),  # an unclosed bracket at the end
        ("def broken(:\n    pass\n", None),
        ("return 1\n", None),  # a compile error, not a parse one
        # checks of the whole module a later piece compiled alone would not make
        ("from __future__ import annotations\n", None),  # not at the file's start
        ("global v0\n", None),  # v0 assigned before, in the first piece
        ("if v1:\n    global v2\n", None),
    ],
)
def test_errors_in_long_files_are_those_of_the_whole_file(bad: str, line: int | None) -> None:
    text = _long("v{i} = {i}\n", 3 * PIECE_LINES) + bad + _long("w{i} = {i}\n", PIECE_LINES)
    try:
        expected: SyntaxError | None = None
        compile(text, "bad.py", "exec", dont_inherit=True)
    except SyntaxError as exc:
        expected = exc
    assert expected is not None
    with pytest.raises(SyntaxError) as raised:
        compile_pieces(parse_checked(text, "bad.py").tree, "bad.py")
    assert (raised.value.msg, raised.value.lineno, raised.value.offset) == (
        expected.msg,
        expected.lineno,
        expected.offset,
    )


def test_a_long_plugin_router_imports_in_pieces(tmp_path: Path) -> None:
    """The loader's import of a 300-route router runs it in pieces (each route's line
    numbers kept: a traceback names the plugin's own line)."""
    from services.loader.importer import import_plugin  # noqa: F401  (the real path)

    routes = "".join(
        textwrap.dedent(
            f"""\
            @router.get("/r{i}")
            async def r{i}() -> dict[str, int]:
                return {{"i": {i}}}
            """
        )
        for i in range(300)
    )
    text = "from fastapi import APIRouter\nrouter = APIRouter()\n" + routes
    codes = compile_pieces(parse_checked(text, "router.py").tree, "router.py")
    assert len(codes) > 5
    scope: dict[str, Any] = {}
    for code in codes:
        exec(code, scope)
    assert len(scope["router"].routes) == 300
    assert (
        scope["r299"].__code__.co_firstlineno == text.splitlines().index('@router.get("/r299")') + 1
    )


async def test_a_long_plugin_loads_in_pieces_and_a_failure_names_its_own_line(
    harness_factory: Any, plugins: Path
) -> None:
    """Through the loader: a 300-route router (run in pieces) serves every route, and one
    that raises at its line 753 is refused naming router.py line 753."""
    from .conftest import write_plugin

    routes = "".join(
        f'@router.get("/r{i}")\nasync def r{i}() -> dict[str, int]:\n    return {{"i": {i}}}\n'
        for i in range(250)
    )
    head = "from fastapi import APIRouter\nrouter = APIRouter()\n"
    write_plugin(plugins, "long", router=head + routes)
    broken = head + routes + "raise RuntimeError('late')\n" + routes.replace("/r", "/s")
    write_plugin(plugins, "late", router=broken)
    assert broken.splitlines().index("raise RuntimeError('late')") + 1 == 753
    with anyio.fail_after(120):
        h = await harness_factory()
        r = await h.client.get("/app/long/r249")
    assert r.status_code == 200 and r.json() == {"i": 249}
    failed = {e.data["name"]: e.data for e in await h.events("PluginLoadFailed")}
    assert failed["late"]["file"] == "router.py" and failed["late"]["line"] == 753, failed
    assert "late" in failed["late"]["error"]


def test_a_later_pieces_annotation_sets_up_annotations_at_the_modules_start() -> None:
    # compiled whole, a module annotating a name anywhere has ``__annotations__`` from
    # its first statement on
    text = (
        "early = '__annotations__' in globals()\n"
        + _long("v{i} = {i}\n", 3 * PIECE_LINES)
        + "if v1:\n    late: int = 1\n"
    )
    tree = parse_checked(text, "ann.py").tree
    codes = compile_pieces(tree, "ann.py")
    assert len(codes) > 1
    pieces, whole = ModuleType("plugin"), ModuleType("plugin")
    for code in codes:
        exec(code, pieces.__dict__)
    exec(compile_tree(tree, "ann.py"), whole.__dict__)
    assert whole.early is True
    assert pieces.early is True
    assert pieces.__annotations__ == whole.__annotations__ == {"late": int}
    assert list(vars(pieces)) == list(vars(whole))


def test_a_router_of_multi_line_decorators_is_parsed_in_pieces() -> None:
    """Routes declared as formatters write them (the decorator's arguments one a line,
    its closing bracket at column 0) are cut between routes, not between a decorator and
    its function: before, every cut missed and the file was parsed at once."""
    routes = _long(
        '@router.get(\n    "/r{i}",\n    response_model=dict,\n)\n'
        'async def r{i}() -> dict[str, int]:\n    return {{"i": {i}}}\n\n\n',
        300,
    )
    text = "from fastapi import APIRouter\nrouter = APIRouter()\n\n\n" + routes
    tree = source._parse_pieces(text, "router.py")
    assert tree is not None
    assert ast.dump(tree, include_attributes=True) == ast.dump(
        ast.parse(text, "router.py"), include_attributes=True
    )


def test_a_file_of_long_strings_with_lines_at_column_0_is_parsed_in_pieces() -> None:
    """Strings of text (help, SQL, templates) whose lines start at column 0 hold cuts that
    miss: a piece that missed is tried again twice as long, instead of the whole file being
    parsed at once after a few such misses anywhere in it (38 of 828 long files of the
    standard library were)."""
    text = _long(
        "def f{i}():\n    return 1\n" + "HELP{i} = '''\n" + "Usage: some text\n" * 150 + "'''\n",
        8,
    )
    tree = source._parse_pieces(text, "help.py")
    assert tree is not None
    assert ast.dump(tree, include_attributes=True) == ast.dump(
        ast.parse(text, "help.py"), include_attributes=True
    )


@pytest.mark.parametrize(
    "encoded",
    [
        "# -*- coding: latin-1 -*-\nNAME = 'caf\u00e9'\n".encode("latin-1"),
        b"\xef\xbb\xbfNAME = 'x'\r\nOTHER = 1\r\n",
    ],
    ids=["latin-1", "bom-crlf"],
)
def test_a_plugin_modules_source_reads_as_the_import_systems_does(
    tmp_path: Path, encoded: bytes
) -> None:
    """What tracebacks and debuggers read through the loader (when the file is not at hand
    to linecache) is the text Python's own loaders give: the coding cookie and the BOM
    honoured, universal newlines."""
    import importlib.machinery
    import importlib.util

    from services.loader.importer import _SourceLoader

    path = tmp_path / "helpers.py"
    path.write_bytes(encoded)
    ours = _SourceLoader(path).get_source("xcore_plugins.p.helpers")
    theirs = importlib.machinery.SourceFileLoader("helpers", str(path)).get_source("helpers")
    assert ours == theirs == importlib.util.decode_source(encoded)


async def test_parse_in_pieces_off_imports_each_file_whole_and_is_put_back_at_the_stop(
    harness_factory: Any, plugins: Path
) -> None:
    from .conftest import write_plugin

    routes = "".join(
        f'@router.get("/r{i}")\nasync def r{i}() -> dict[str, int]:\n    return {{"i": {i}}}\n'
        for i in range(250)
    )
    text = "from fastapi import APIRouter\nrouter = APIRouter()\n" + routes
    write_plugin(plugins, "long", router=text)

    def pieces() -> int:
        return len(compile_pieces(parse_checked(text, "router.py").tree, "router.py"))

    assert pieces() > 5
    with anyio.fail_after(120):
        h = await harness_factory(loader={"parse_in_pieces": False})
        assert pieces() == 1  # one parse, one code object, as Python imports it
        r = await h.client.get("/app/long/r249")
        assert r.status_code == 200 and r.json() == {"i": 249}
        await h.stop()
    assert pieces() > 5  # put back


def parse_counted(
    monkeypatch: pytest.MonkeyPatch, text: str, filename: str
) -> tuple[ast.Module | None, list[int]]:
    """``text`` parsed in pieces, and the length of each text handed to ``ast.parse``."""
    parsed: list[int] = []
    real = ast.parse

    def counting(src: Any, *args: Any, **kwargs: Any) -> Any:
        parsed.append(len(src))
        return real(src, *args, **kwargs)

    monkeypatch.setattr(ast, "parse", counting)  # (the module source.py parses with)
    try:
        return source._parse_pieces(text, filename), parsed
    finally:
        monkeypatch.undo()


def test_a_long_files_pieces_parse_each_line_a_bounded_number_of_times(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Parsing in pieces reads a file's text a bounded number of times, whatever its
    length: each piece used to be parsed behind one newline per line before it (to keep
    its line numbers), so a file of n lines cost n^2 / PIECE_LINES characters of parsing
    (100,000 lines: 4.3 s against 0.9 s at once, an import timeout further on)."""
    text = "".join(f"x{i} = {i}\n" for i in range(20 * PIECE_LINES * 20))
    tree, parsed = parse_counted(monkeypatch, text, "long.py")
    assert tree is not None
    assert len(parsed) > 100  # (in pieces)
    assert sum(parsed) <= 2 * len(text)
    assert ast.dump(tree, include_attributes=True) == ast.dump(
        ast.parse(text, "long.py"), include_attributes=True
    )


def test_no_piece_is_cut_inside_a_triple_quoted_string() -> None:
    """A text of lines at column 0 inside a triple-quoted string (help, SQL) offers no
    cut: each would start a piece that cannot parse alone."""
    text = (
        "def f():\n    return 1\n"
        "HELP = '''\nUsage: xcore it's fine\nimport nothing\n'''  # closed\n"
        'SQL = """select 1\nfrom t\n"""\n'
        "x = 'a \\' b'  # '''\n"
        "y = 2\n"
    )
    lines = text.split("\n")
    cuts = source._cuts(lines)
    inside = {3, 4, 5, 7, 8}  # the strings' own lines (the closing ones included)
    assert not inside & set(cuts), cuts
    assert {2, 6, 9, 10} <= set(cuts), cuts


@pytest.mark.parametrize(
    ("opening", "line"),
    [
        ("try:\n    pass\nexcept ValueError:\n    pass\n", "except(KeyError):"),
        ("try:\n    pass\nexcept* ValueError:\n    pass\n", "except* KeyError:"),
        ("if x0:\n    pass\nelif x1:\n    pass\n", "elif(x2):"),
    ],
    ids=["except-bracket", "except-star", "elif-bracket"],
)
def test_a_continuation_written_without_a_space_is_no_cut(opening: str, line: str) -> None:
    """``except(KeyError):``, ``except* E:``, ``elif(x):`` continue the statement before
    them as ``except KeyError:`` does: a piece starting there never parses alone, and the
    whole file used to be parsed at once (the event loop held throughout)."""
    head = "".join(f"x{i} = {i}\n" for i in range(PIECE_LINES - 4))
    text = head + opening + line + "\n    pass\n" + "".join(f"y{i} = {i}\n" for i in range(99))
    assert PIECE_LINES not in source._cuts(text.split("\n"))
    tree = source._parse_pieces(text, "handlers.py")
    assert tree is not None
    assert ast.dump(tree, include_attributes=True) == ast.dump(
        ast.parse(text, "handlers.py"), include_attributes=True
    )


def test_pieces_of_valid_escapes_and_numbers_are_parsed_at_their_own_numbers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only a piece the parser may warn about is parsed behind a newline per line before
    it: a valid escape (``"\\n"``, ``"\\x41"``, a line's closing backslash), a hexadecimal
    or exponent literal warn about nothing, and a file of such lines in every piece cost
    n^2 / PIECE_LINES characters of parsing (100,000 lines: 7.8 s against 1.5 s at once)."""
    lines = [
        'a{i} = "line\\n\\t\\\\ \\x41 \\\' \\" \\0 \\377 \\a\\b\\f\\r\\v"\n',
        "b{i} = 0xFF + 1e5 + 2j + 0o17 + 1_000 + 1.5E-3\n",
        "c{i} = (1 + \\\n    2)\n",
    ]
    text = "".join(lines[i % 3].format(i=i) for i in range(20 * PIECE_LINES * 20))
    tree, parsed = parse_counted(monkeypatch, text, "escapes.py")
    assert tree is not None
    assert sum(parsed) <= 2 * len(text)
    assert ast.dump(tree, include_attributes=True) == ast.dump(
        ast.parse(text, "escapes.py"), include_attributes=True
    )


@pytest.mark.parametrize(
    "line",
    [
        'PATTERN = "\\d+"\n',
        "N = 1if x0 else 2\n",
        'P = "\\d"\n',
        'P = b"\\N{BULLET}"\n',
        'P = "\\777"\n',
        'P = f"{x0}\\d"\n',
        "N = [0x1for x in ()]\n",
        "N = 1.0if x0 else 2\n",
        "N = 1in ()\n",
        "N = 1or 2\n",
        "N = 1and 2\n",
        "N = 1is 2\n",
        "N = 1not in ()\n",
        "N = 1 if 1else 2\n",
    ],
)
def test_every_warning_of_the_parser_names_its_own_line(line: str) -> None:
    """Each kind of warning the parser gives (an invalid escape in a string, bytes or an
    f-string, an octal escape past 0o377, a number run into a keyword) while a later
    piece is parsed is given once, at the line of the file, as a parse at once gives it
    (its category is Python's: DeprecationWarning or SyntaxWarning by version)."""
    text = "".join(f"x{i} = {i}\n" for i in range(4 * PIECE_LINES)) + line

    def warned(parse: Any) -> list[tuple[type[Warning], int]]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert parse() is not None
        return [(w.category, w.lineno) for w in caught]

    at_once = warned(lambda: ast.parse(text, filename="warns.py"))
    assert [lineno for _, lineno in at_once] == [4 * PIECE_LINES + 1]
    assert warned(lambda: source._parse_pieces(text, "warns.py")) == at_once
