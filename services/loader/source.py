"""Parsing and compiling plugin source under a nesting bound of the loader's own.

Guarantee: a plugin ``.py`` file whose syntax tree is nested deeper than
:data:`MAX_NESTING` levels is refused with :class:`SourceTooDeep`, naming the depth
and the line, whatever the interpreter's recursion limit is (a host application, a
test library or a debugger may raise it, and CPython's compiler then recurses as deep
as the file asks, up to overflowing the C stack of the loader's thread).

The same holds for what the import system would recurse on: a module name of more
than :data:`MAX_DOTTED_PARTS` parts in an ``import`` is refused (importlib recurses once
per part), and :mod:`.importer` bounds how deep plugin modules import one another.

Mechanism: ``ast.parse`` (CPython's parser has a fixed stack bound of its own and
raises ``MemoryError``/``SyntaxError`` past it), then one iterative walk measuring the
depth and collecting the import statements, then ``compile`` of the checked tree.

Each file is parsed once per import (:class:`Parsed`): the loader's check of what a
plugin imports (``importer.check_plugin_imports``) keeps the trees it parsed, and the
import compiles them when the file still holds the same bytes.

*In pieces.* Parsing and compiling are single calls into C that hold the interpreter
throughout (~20-30 ms and ~10-20 ms for a 900-line file): the event loop waited behind
each (issue 8). A file of more than :data:`PIECE_LINES` lines is parsed in pieces of
about that many lines, cut before lines at column 0 that can start a top-level
statement (not inside a triple-quoted string), each piece parsed alone and moved to its
own line numbers, with :func:`kernel.pacing.pace` between two (a build thread leaves the
loop its share); the tree is the one ``ast.parse`` builds.
A piece that does not parse alone (the cut fell inside a bracket, a string, before an
``else``) is tried again twice as long; past a few such misses, or for any error, the whole
file is parsed at once, so errors are ``ast.parse``'s own. The import compiles and runs
such a file as consecutive code objects of its top-level statements in pieces
(:func:`compile_pieces`), in the module's namespace and in order, with the file's
``__future__`` flags; a piece never starts with a string statement (it would be taken as
the module's docstring); any compile error is that of the whole tree.
"""

from __future__ import annotations
import __future__

import ast
import bisect
import importlib.util
import re
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import CodeType

from kernel.pacing import pace

__all__ = [
    "AST_LOCK",
    "MAX_DOTTED_PARTS",
    "MAX_NESTING",
    "PIECE_LINES",
    "Parsed",
    "SourceTooDeep",
    "compile_pieces",
    "compile_source",
    "compile_tree",
    "nesting",
    "parse_checked",
    "parse_source",
    "use_pieces",
]

#: Deepest syntax tree accepted in a plugin file. Hand-written code stays far below
#: (a chain ``a + b + ...`` counts one level per operand); CPython compiles 1,000 levels
#: at its default recursion limit.
MAX_NESTING = 1_000


#: Most dotted parts in a module name a plugin file imports (``from .a.b.c import x``):
#: importlib recurses once per part before it looks for any of them.
MAX_DOTTED_PARTS = 64


#: CPython 3.11 keeps the depth counter of its conversions between syntax trees and
#: Python objects (``ast.parse`` building the tree, ``compile`` of a tree) per
#: interpreter, not per thread: two conversions interleaved by a thread switch (Python
#: code run in the middle, such as a weakref callback during a collection, lets another
#: thread in) fail with ``SystemError: AST constructor recursion depth mismatch``. The
#: loader imports plugins in several threads at boot: each conversion holds this lock.
AST_LOCK = threading.Lock()

#: A file of more lines is parsed and compiled in pieces of about this many lines, with
#: a pause between (kernel/pacing.py): 100 lines held the interpreter 1-2.8 ms, a request
#: arriving meanwhile waiting behind it; 25 lines, 0.5 ms per parse or compile (p50) in
#: a server under traffic, up to 1.3 ms; 12 lines, 0.22-0.28 ms, under 0.9 ms.
PIECE_LINES = 12
#: Whether long files are parsed, compiled and run in pieces at all (the loader's
#: ``parse_in_pieces`` setting, :func:`use_pieces`; off: one parse, one code object).
_pieces = True


def use_pieces(on: bool) -> bool:
    """Turn parsing in pieces on or off for the process; returns the previous state."""
    global _pieces
    previous, _pieces = _pieces, on
    return previous


#: Times one piece fails to parse alone (a cut inside a bracket or a string: it then
#: takes twice as many lines) before the rest of the file is parsed at once.
_MISSES = 6
#: What the parser may warn about: an invalid escape sequence (a backslash before none of
#: ``\\'"abfnrtvx``, an octal digit or a line end: ``\N``, ``\u`` and ``\U`` are, in
#: bytes; an octal escape past ``\377``), a number run into a keyword (``1if``,
#: ``0x1for``). A piece holding it is parsed at its own line numbers, behind a newline
#: per line before it: any backslash or letter in a number used to be enough, and a
#: file of them in every piece cost n^2 / PIECE_LINES characters of parsing.
_WARNS = re.compile(
    r"(?<!\\)(?:\\\\)*\\(?:[^\\'\"abfnrtvx0-7\n]|[4-7][0-7]{2})"
    r"|(?<!\w)\d[\w.]*?(?:and|else|for|i[fns]|not|or)"
)
#: Lines that continue the statement before them at column 0 (by their first name:
#: ``except(KeyError):``, ``except* E:`` and ``elif(x):`` continue as well).
_CONTINUATIONS = ("else", "elif", "except", "finally")
_NOT_NAME = re.compile(r"\W")
#: What opens or closes a string on a line, or starts a comment (an escaped character is
#: taken as one token, so that its quote closes nothing).
_QUOTES = re.compile(r"\\.|#|'''|\"\"\"|'|\"")


class SourceTooDeep(ValueError):
    """A plugin file nested deeper than the loader accepts."""

    def __init__(self, line: int | None, what: str | None = None) -> None:
        where = f"line {line}: " if line else ""
        what = what or f"nested more than {MAX_NESTING} levels deep (the loader's limit)"
        super().__init__(f"{where}{what}")
        self.lineno = line


def nesting(tree: ast.AST, limit: int = MAX_NESTING) -> tuple[int, int | None]:
    """The depth of ``tree`` (stopping once past ``limit``) and the line where it peaks."""
    deepest, line = 0, None
    stack: list[tuple[ast.AST, int]] = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > deepest:
            deepest, line = depth, getattr(node, "lineno", line)
            if deepest > limit:
                break
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return deepest, line


@dataclass(frozen=True, slots=True)
class Parsed:
    """One plugin file, parsed and checked: its bytes, its tree and its import statements."""

    source: bytes | str
    tree: ast.Module
    imports: tuple[ast.Import | ast.ImportFrom, ...]


def _scan(tree: ast.AST, limit: int = MAX_NESTING) -> tuple[int, int | None, list[ast.AST]]:
    """:func:`nesting` and the import statements of ``tree``, in one walk."""
    deepest, line = 0, None
    imports: list[ast.AST] = []
    stack: list[tuple[ast.AST, int]] = [(tree, 1)]
    push = stack.append
    children = ast.iter_child_nodes
    while stack:
        node, depth = stack.pop()
        if depth > deepest:
            deepest, line = depth, getattr(node, "lineno", line)
            if deepest > limit:
                break
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.append(node)
        for child in children(node):
            push((child, depth + 1))
    imports.sort(key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", 0)))
    return deepest, line, imports


def _open_string(line: str, inside: str | None) -> str | None:
    """The triple quote still open at the end of ``line``, which starts inside the string
    that ``inside`` opened (None: outside any). A guess, not a tokenizer: a cut it lets
    fall inside a string only costs a piece that does not parse alone."""
    for match in _QUOTES.finditer(line):
        token = match.group()
        if token[0] == "\\":
            continue
        if inside is None:
            if token == "#":
                break
            inside = token
        elif token == inside:
            inside = None
    return inside if inside is not None and len(inside) == 3 else None


def _cuts(lines: list[str]) -> list[int]:
    """Indexes of the lines before which a piece may start (column 0, a name or ``@``,
    not a continuation of the statement before, not after a decorator — one line or
    several, ``@router.get(`` to ``)`` — or a backslash, not inside a triple-quoted
    string: a text of lines at column 0 would hold nothing but cuts that miss)."""
    cuts: list[int] = []
    previous = ""
    decorating = False  # since a decorator at column 0, until the next name there
    inside: str | None = None  # the triple quote of a string open at this line's start
    for index, line in enumerate(lines):
        first = line[:1]
        opened, inside = inside, _open_string(line, inside)
        if opened is not None:
            continue  # (a line of a string's text: no cut, and it is no statement)
        if index and first and (first.isalpha() or first in "_@"):
            word = _NOT_NAME.split(line, 1)[0]
            if (
                word not in _CONTINUATIONS
                and not decorating
                and not previous.startswith("@")
                and not previous.endswith("\\")
            ):
                cuts.append(index)
        if first == "@":
            decorating = True
        elif first.isalpha() or first == "_":
            decorating = False
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            previous = line.rstrip()
    return cuts


def _after(cuts: list[int], line: int, default: int) -> int:
    """The first of the sorted ``cuts`` past ``line`` (``default`` if none): a search, not
    a scan, or a file of 100,000 lines spends seconds finding its cuts."""
    index = bisect.bisect_right(cuts, line)
    return cuts[index] if index < len(cuts) else default


def _parse_pieces(source: bytes | str, filename: str) -> ast.Module | None:
    """The tree of ``source`` parsed in pieces; None when it is short or cannot be
    (the caller then parses it at once, and gets ``ast.parse``'s own error)."""
    try:
        text = importlib.util.decode_source(source) if isinstance(source, bytes) else source
    except (SyntaxError, UnicodeDecodeError, LookupError, ValueError):
        return None
    if not _pieces or text.count("\n") <= PIECE_LINES:
        return None
    if "\r" in text or "barry_as_FLUFL" in text:
        return None
    lines = text.split("\n")
    cuts = _cuts(lines)
    body: list[ast.stmt] = []
    start = 0
    while start < len(lines):
        # the first cut at least PIECE_LINES lines on (or the end of the file)
        end = _after(cuts, start + PIECE_LINES - 1, len(lines))
        misses = 0
        while True:
            # (parsed alone, then moved to its lines: behind a newline per line before
            # it, a file of n lines cost n^2 / PIECE_LINES characters of parsing; only a
            # piece the parser may warn about still is, so its warning names its line)
            piece = "\n".join(lines[start:end])
            shift = start
            if start and _WARNS.search(piece):
                piece, shift = "\n" * start + piece, 0
            try:
                with AST_LOCK:
                    part = ast.parse(piece, filename=filename)
            except (SyntaxError, ValueError, MemoryError, RecursionError):
                # (a long string with lines at column 0, a long bracket: twice the
                # lines, so that a file of many costs at most about twice its parse)
                misses += 1
                if end >= len(lines) or misses > _MISSES:
                    return None
                end = _after(cuts, start + 2 * (end - start) - 1, len(lines))
                pace()
                continue
            break
        if shift:
            ast.increment_lineno(part, shift)
        body.extend(part.body)
        start = end
        pace()
    return ast.Module(body=body, type_ignores=[])


def parse_checked(source: bytes | str, filename: str) -> Parsed:
    """``source`` parsed and checked (see :func:`parse_source`), with its imports."""
    tree = _parse_pieces(source, filename)
    if tree is None:
        with AST_LOCK:
            tree = ast.parse(source, filename=filename)
    depth, line, imports = _scan(tree)
    if depth > MAX_NESTING:
        raise SourceTooDeep(line)
    for node in imports:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            assert isinstance(node, ast.ImportFrom)
            names = [node.module or ""]
        for name in names:
            parts = name.count(".") + 1
            if parts > MAX_DOTTED_PARTS:
                raise SourceTooDeep(
                    getattr(node, "lineno", None),
                    f"imports a module name of {parts} dotted parts, more than the "
                    f"loader's limit of {MAX_DOTTED_PARTS}",
                )
    return Parsed(source, tree, tuple(imports))  # type: ignore[arg-type]


def parse_source(source: bytes | str, filename: str) -> ast.Module:
    """The checked syntax tree of ``source``; raises SyntaxError, SourceTooDeep, ValueError,
    MemoryError or RecursionError."""
    return parse_checked(source, filename).tree


def compile_tree(tree: ast.Module, filename: str) -> CodeType:
    """A tree from :func:`parse_checked` (or :func:`parse_source`) compiled for ``exec``."""
    with AST_LOCK:
        return compile(tree, filename, "exec", dont_inherit=True)


def _future_flags(body: list[ast.stmt]) -> int:
    """The compiler flags of the ``from __future__`` imports that open ``body``."""
    flags = 0
    for index, node in enumerate(body):
        if index == 0 and _is_string(node):
            continue  # the docstring
        if not (isinstance(node, ast.ImportFrom) and node.module == "__future__"):
            break
        for alias in node.names:
            feature = getattr(__future__, alias.name, None)
            if isinstance(feature, __future__._Feature):
                flags |= feature.compiler_flag
    return flags


def _is_string(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    )


def compile_pieces(tree: ast.Module, filename: str) -> list[CodeType]:
    """A tree from :func:`parse_checked` compiled for ``exec`` as consecutive code
    objects, one per piece of about :data:`PIECE_LINES` lines of top-level statements
    (one for a short file), pausing between two (kernel/pacing.py): ``exec`` of each, in
    order, in one namespace runs the module. A compile error is the whole tree's."""
    if not _pieces:
        return [compile_tree(tree, filename)]
    groups: list[list[ast.stmt]] = []
    first = 0
    for node in tree.body:
        # (a piece opening with a string would set the module's __doc__)
        if groups and (node.lineno - first < PIECE_LINES or _is_string(node)):
            groups[-1].append(node)
        else:
            groups.append([node])
            first = node.lineno
    if len(groups) <= 1 or not _splittable(tree.body, groups):
        return [compile_tree(tree, filename)]  # (or the whole tree's error)
    flags = _future_flags(tree.body)
    codes: list[CodeType] = []
    if any(_annotates(group) for group in groups[1:]):
        # compiled whole, the module sets up ``__annotations__`` before its first
        # statement (SETUP_ANNOTATIONS): a later piece's annotation would only make it
        # at that piece
        codes.append(_SETUP_ANNOTATIONS)
    try:
        for index, group in enumerate(groups):
            if index:
                pace()
            module = ast.Module(body=group, type_ignores=[])
            with AST_LOCK:
                codes.append(compile(module, filename, "exec", flags=flags, dont_inherit=True))
    except (SyntaxError, ValueError, TypeError):
        return [compile_tree(tree, filename)]  # the whole tree's error (or its one code)
    return codes


def _module_scope(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """The statements of ``body`` that run in the module's scope (in blocks, not in
    function or class bodies)."""
    stack = list(reversed(body))
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        inner: list[ast.stmt] = []
        for field in ("body", "orelse", "finalbody"):
            inner.extend(getattr(node, field, None) or ())
        for handler in getattr(node, "handlers", None) or ():
            inner.extend(handler.body)
        for case in getattr(node, "cases", None) or ():
            inner.extend(case.body)
        stack.extend(reversed(inner))


def _annotates(body: list[ast.stmt]) -> bool:
    """Whether ``body`` annotates a name in the module's scope (the compiler then sets up
    ``__annotations__`` at its start)."""
    return any(isinstance(node, ast.AnnAssign) for node in _module_scope(body))


def _splittable(body: list[ast.stmt], groups: list[list[ast.stmt]]) -> bool:
    """Whether ``body`` means the same compiled in ``groups`` as compiled whole: the
    compiler checks a ``from __future__`` import is at the file's start and a module-level
    ``global`` after the name's uses across the whole module, which a later piece, compiled
    alone, would not see; and since 3.14 a module's annotations are one function
    (``__annotate__``) that each piece would replace."""
    prefix = 0
    for index, node in enumerate(body):
        if not (
            (index == 0 and _is_string(node))
            or (isinstance(node, ast.ImportFrom) and node.module == "__future__")
        ):
            prefix = index
            break
    else:
        return True
    for node in _module_scope(body[prefix:]):
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            return False  # misplaced: the whole file's SyntaxError
    for group in groups[1:]:
        if any(isinstance(node, ast.Global) for node in _module_scope(group)):
            return False
    return sys.version_info < (3, 14) or not any(_annotates(group) for group in groups[1:])


#: A code object that only sets up the module's ``__annotations__`` (as the compiler
#: does at the start of a module that annotates a name anywhere in its scope).
_SETUP_ANNOTATIONS = compile("if False:\n    _: int\n", "<annotations>", "exec", dont_inherit=True)


def compile_source(source: bytes | str, filename: str) -> CodeType:
    """``source`` compiled for ``exec``, after the nesting check of :func:`parse_source`."""
    return compile_tree(parse_source(source, filename), filename)
