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
import compiles them when the file still holds the same bytes. Parsing and compiling
are single calls into C that hold the interpreter throughout (~20 ms and ~10 ms for a
900-line file): the event loop waits behind each (issue 8).
"""

from __future__ import annotations

import ast
import threading
from dataclasses import dataclass
from types import CodeType

__all__ = [
    "AST_LOCK",
    "MAX_DOTTED_PARTS",
    "MAX_NESTING",
    "Parsed",
    "SourceTooDeep",
    "compile_source",
    "compile_tree",
    "nesting",
    "parse_checked",
    "parse_source",
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


def parse_checked(source: bytes | str, filename: str) -> Parsed:
    """``source`` parsed and checked (see :func:`parse_source`), with its imports."""
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


def compile_source(source: bytes | str, filename: str) -> CodeType:
    """``source`` compiled for ``exec``, after the nesting check of :func:`parse_source`."""
    return compile_tree(parse_source(source, filename), filename)
