"""The condition language of ``replay bisect --until EXPR``: safe, small, read-only.

Guarantee: an expression given on the command line can only *read* projection state.
It is parsed with Python's expression grammar (``ast.parse(mode="eval")``) and then
interpreted node by node here — never passed to ``eval`` — and anything not in the list
below is refused before the replay starts, with the offending piece named.

What it may contain (see docs/replay.md for examples):

- projection names, full (``scheduler.tasks``) or by their last part when unambiguous
  (``tasks``); ``position`` is the position being tested;
- ``a.b`` (a key of a mapping, or a public attribute of a state object: never a name
  starting with ``_``, never a method), ``a["key"]``, ``a[0]``;
- literals (numbers, strings, True/False/None), ``not``/``and``/``or``, comparisons
  (``== != < <= > >= in not in``), ``+ - * / // %`` on numbers;
- calls of ``len any all min max sum abs`` and of ``.keys() .values() .items()`` on a
  mapping; one-``for`` generator expressions: ``any(t.failures > 3 for t in
  tasks.tasks.values())``.

A missing key or attribute reads as ``None`` (the task does not exist *yet* at this
position), and an ordering comparison involving ``None`` is false, so
``tasks.tasks["hello.cleanup"].failures > 3`` is simply false before the task appears.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from replay.errors import ReplayError

__all__ = ["Expression", "compile_expression"]

#: Long enough for any real condition; short enough that no expression nests deeper than
#: the interpreter can parse (a RecursionError inside ast.parse breaks later parses on
#: CPython 3.11).
MAX_LENGTH = 500
MAX_ITEMS = 1_000_000
#: No arithmetic result (or operand pair) bigger than this many bits.
MAX_INT_BITS = 4096
#: Generator steps, all generators together, in one evaluation: nested generators over
#: the same big value would otherwise multiply their lengths.
MAX_STEPS = 5_000_000

FUNCTIONS: dict[str, Callable[..., Any]] = {
    "len": len,
    "any": any,
    "all": all,
    "min": min,
    "max": max,
    "sum": sum,
    "abs": abs,
}
MAPPING_METHODS = {"keys", "values", "items"}

COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: b is not None and a in b,
    ast.NotIn: lambda a, b: b is None or a not in b,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
}
ORDERING = (ast.Lt, ast.LtE, ast.Gt, ast.GtE)
BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}


class _Namespace:
    """A dotted prefix of projection names (``scheduler`` in ``scheduler.tasks``)."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix


class Expression:
    """A parsed condition; ``evaluate(projections, position)`` gives its truth."""

    def __init__(self, text: str, tree: ast.Expression, roots: dict[str, str], names: set[str]):
        self.text = text
        self._tree = tree
        self._roots = roots  # name usable at the root -> projection name or namespace prefix
        self._all_names = names
        #: The projection names the expression reads: only these need folding.
        self.projections: set[str] = set()
        self._steps = 0
        self._collect(tree.body, set())

    # -- static checks ---------------------------------------------------------------

    def _fail(self, node: ast.AST, why: str) -> ReplayError:
        piece = ast.get_source_segment(self.text, node) or type(node).__name__
        return ReplayError(f"bad expression {self.text!r}: {why} (at {piece!r})")

    def _dotted(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute):
            base = self._dotted(node.value)
            return None if base is None else f"{base}.{node.attr}"
        return None

    def _collect(self, node: ast.AST, bound: set[str]) -> None:
        """Check every node is allowed; record which projections are read."""
        if isinstance(node, ast.Name):
            if node.id in bound or node.id in FUNCTIONS or node.id == "position":
                return
            target = self._roots.get(node.id)
            if target is None:
                known = ", ".join(sorted(self._roots)) or "none installed"
                raise self._fail(node, f"unknown name {node.id!r} (projections: {known})")
            if target in self._all_names:
                self.projections.add(target)
            return
        if isinstance(node, ast.Attribute):
            if node.attr.startswith("_"):
                raise self._fail(node, "names starting with '_' are not readable")
            dotted = self._dotted(node)
            if dotted is not None:
                root = dotted.split(".", 1)[0]
                if root not in bound and root in self._roots:
                    full = self._roots[root] + dotted[len(root) :]
                    for name in self._all_names:
                        if full == name or full.startswith(name + "."):
                            self.projections.add(name)
                            return
            self._collect(node.value, bound)
            return
        if isinstance(node, ast.Constant):
            if not isinstance(node.value, (int, float, str, bool, type(None))):
                raise self._fail(node, "only numbers, strings, True, False and None")
            return
        if isinstance(node, ast.Subscript):
            if isinstance(node.slice, ast.Slice):
                raise self._fail(node, "slices are not supported")
            self._collect(node.value, bound)
            self._collect(node.slice, bound)
            return
        if isinstance(node, ast.BoolOp):
            for v in node.values:
                self._collect(v, bound)
            return
        if isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, (ast.Not, ast.USub, ast.UAdd)):
                raise self._fail(node, "only 'not', '-' and '+' as unary operators")
            self._collect(node.operand, bound)
            return
        if isinstance(node, ast.BinOp):
            if type(node.op) not in BINARY:
                raise self._fail(node, "only + - * / // % as arithmetic")
            self._collect(node.left, bound)
            self._collect(node.right, bound)
            return
        if isinstance(node, ast.Compare):
            for op in node.ops:
                if type(op) not in COMPARE:
                    raise self._fail(node, "unsupported comparison")
            self._collect(node.left, bound)
            for c in node.comparators:
                self._collect(c, bound)
            return
        if isinstance(node, (ast.Tuple, ast.List)):
            for e in node.elts:
                self._collect(e, bound)
            return
        if isinstance(node, ast.Call):
            if node.keywords:
                raise self._fail(node, "keyword arguments are not supported")
            if isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS:
                pass
            elif isinstance(node.func, ast.Attribute) and node.func.attr in MAPPING_METHODS:
                if node.args:
                    raise self._fail(node, f".{node.func.attr}() takes no argument")
                self._collect(node.func.value, bound)
            else:
                raise self._fail(
                    node,
                    "only len, any, all, min, max, sum, abs and .keys/.values/.items() "
                    "may be called",
                )
            for a in node.args:
                if isinstance(a, ast.Starred):
                    raise self._fail(a, "*args is not supported")
                self._collect(a, bound)
            return
        if isinstance(node, ast.GeneratorExp):
            if len(node.generators) != 1 or node.generators[0].is_async:
                raise self._fail(node, "a generator takes exactly one 'for'")
            gen = node.generators[0]
            names = self._targets(gen.target)
            self._collect(gen.iter, bound)
            inner = bound | names
            for cond in gen.ifs:
                self._collect(cond, inner)
            self._collect(node.elt, inner)
            return
        raise self._fail(node, f"{type(node).__name__} is not allowed in a condition")

    def _targets(self, target: ast.AST) -> set[str]:
        if isinstance(target, ast.Name):
            return {target.id}
        if isinstance(target, ast.Tuple) and all(isinstance(e, ast.Name) for e in target.elts):
            return {e.id for e in target.elts if isinstance(e, ast.Name)}
        raise self._fail(target, "a 'for' binds a name or a tuple of names")

    # -- evaluation ------------------------------------------------------------------

    def evaluate(self, projections: Mapping[str, Any], position: int = 0) -> bool:
        self._steps = 0
        try:
            return bool(self._eval(self._tree.body, {}, projections, position))
        except ReplayError:
            raise
        except RecursionError:
            raise ReplayError(f"expression {self.text[:80]!r}...: too deeply nested") from None
        except Exception as exc:
            raise ReplayError(
                f"expression {self.text!r} failed at position {position}: "
                f"{type(exc).__name__}: {exc}"
            ) from None

    def _eval(self, node: ast.AST, env: dict[str, Any], ps: Mapping[str, Any], pos: int) -> Any:
        ev = self._eval
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in env:
                return env[node.id]
            if node.id == "position":
                return pos
            if node.id in FUNCTIONS:
                return FUNCTIONS[node.id]
            target = self._roots[node.id]
            return ps[target] if target in ps else _Namespace(target)
        if isinstance(node, ast.Attribute):
            return _attr(ev(node.value, env, ps, pos), node.attr, ps)
        if isinstance(node, ast.Subscript):
            return _item(ev(node.value, env, ps, pos), ev(node.slice, env, ps, pos))
        if isinstance(node, ast.BoolOp):
            if isinstance(node.op, ast.And):
                result: Any = True
                for v in node.values:
                    result = ev(v, env, ps, pos)
                    if not result:
                        return result
                return result
            result = False
            for v in node.values:
                result = ev(v, env, ps, pos)
                if result:
                    return result
            return result
        if isinstance(node, ast.UnaryOp):
            value = ev(node.operand, env, ps, pos)
            if isinstance(node.op, ast.Not):
                return not value
            if value is None:
                return None
            return -value if isinstance(node.op, ast.USub) else +value
        if isinstance(node, ast.BinOp):
            left, right = ev(node.left, env, ps, pos), ev(node.right, env, ps, pos)
            if left is None or right is None:
                return None
            return self._arith(node.op, left, right)
        if isinstance(node, ast.Compare):
            left = ev(node.left, env, ps, pos)
            for op, comp in zip(node.ops, node.comparators, strict=True):
                right = ev(comp, env, ps, pos)
                if isinstance(op, ORDERING) and (left is None or right is None):
                    return False
                try:
                    ok = COMPARE[type(op)](left, right)
                except TypeError:
                    return False
                if not ok:
                    return False
                left = right
            return True
        if isinstance(node, ast.Tuple):
            return tuple(ev(e, env, ps, pos) for e in node.elts)
        if isinstance(node, ast.List):
            return [ev(e, env, ps, pos) for e in node.elts]
        if isinstance(node, ast.Call):
            args = [ev(a, env, ps, pos) for a in node.args]
            if isinstance(node.func, ast.Name):
                fn = FUNCTIONS[node.func.id]
                if fn in (min, max, sum) and len(args) == 1 and args[0] is not None:
                    items = [x for x in args[0] if x is not None]
                    if fn is sum:
                        return sum(items)
                    return fn(items) if items else None
                if any(a is None for a in args):
                    return None
                return fn(*args)
            assert isinstance(node.func, ast.Attribute)
            owner = ev(node.func.value, env, ps, pos)
            if owner is None:
                return []
            if not isinstance(owner, Mapping):
                raise ReplayError(
                    f"bad expression {self.text!r}: .{node.func.attr}() needs a mapping, "
                    f"got {type(owner).__name__}"
                )
            return list(getattr(owner, node.func.attr)())
        if isinstance(node, ast.GeneratorExp):
            return self._generate(node, env, ps, pos)
        raise ReplayError(f"bad expression {self.text!r}: {type(node).__name__}")

    def _arith(self, op: ast.operator, left: Any, right: Any) -> Any:
        """``left op right``, bounded: numbers only (``+`` also joins strings and lists),
        and no result bigger than ``MAX_INT_BITS`` bits or ``MAX_ITEMS`` items — else
        nested generators squaring a number, or ``"%0999999999d" % 1``, would hang or
        exhaust memory."""
        numbers = (int, float)
        if isinstance(left, numbers) and isinstance(right, numbers):
            if (
                isinstance(left, int)
                and isinstance(right, int)
                and left.bit_length() + right.bit_length() > MAX_INT_BITS
            ):
                raise ReplayError(
                    f"bad expression {self.text!r}: a number grew past {MAX_INT_BITS} bits"
                )
            return BINARY[type(op)](left, right)
        if (
            isinstance(op, ast.Add)
            and isinstance(left, (str, list, tuple))
            and type(left) is type(right)
        ):
            if len(left) + len(right) > MAX_ITEMS:
                raise ReplayError(
                    f"bad expression {self.text!r}: a value grew past {MAX_ITEMS} items"
                )
            joined: Any = left + right  # type: ignore[operator]
            return joined
        sign = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//"}
        raise ReplayError(
            f"bad expression {self.text!r}: '{sign.get(type(op), '%')}' works on numbers only"
        )

    def _generate(
        self, node: ast.GeneratorExp, env: dict[str, Any], ps: Mapping[str, Any], pos: int
    ) -> Iterable[Any]:
        gen = node.generators[0]
        source = self._eval(gen.iter, env, ps, pos)
        if source is None:
            return []
        if isinstance(source, Mapping):
            source = list(source.keys())
        out: list[Any] = []
        for i, item in enumerate(source):
            if i >= MAX_ITEMS:
                raise ReplayError(f"bad expression {self.text!r}: more than {MAX_ITEMS} items")
            self._steps += 1
            if self._steps > MAX_STEPS:
                raise ReplayError(
                    f"bad expression {self.text!r}: more than {MAX_STEPS} generator steps"
                )
            inner = dict(env)
            if isinstance(gen.target, ast.Name):
                inner[gen.target.id] = item
            else:
                names = [e.id for e in gen.target.elts if isinstance(e, ast.Name)]  # type: ignore[attr-defined]
                values = list(item)
                if len(values) != len(names):
                    raise ReplayError(
                        f"bad expression {self.text!r}: cannot unpack {len(values)} values "
                        f"into {len(names)} names"
                    )
                inner.update(zip(names, values, strict=True))
            if all(self._eval(c, inner, ps, pos) for c in gen.ifs):
                out.append(self._eval(node.elt, inner, ps, pos))
        return out


def _attr(owner: Any, name: str, ps: Mapping[str, Any]) -> Any:
    if owner is None:
        return None
    if isinstance(owner, _Namespace):
        full = f"{owner.prefix}.{name}"
        return ps[full] if full in ps else _Namespace(full)
    if isinstance(owner, Mapping):
        return owner.get(name)
    if name.startswith("_"):
        return None
    value = getattr(owner, name, None)
    if callable(value):
        raise ReplayError(f"{type(owner).__name__}.{name} is a method; conditions read data only")
    return value


def _item(owner: Any, key: Any) -> Any:
    if owner is None:
        return None
    if isinstance(owner, Mapping):
        try:
            return owner.get(key)
        except TypeError:
            return None
    if isinstance(owner, (list, tuple)) or (
        hasattr(owner, "__getitem__") and hasattr(owner, "__len__")
    ):
        if not isinstance(key, int):
            return None
        try:
            return owner[key]
        except IndexError:
            return None
    return None


def compile_expression(text: str, projection_names: Iterable[str]) -> Expression:
    """Parse and check ``text`` against the installed projection names."""
    if not text or not text.strip():
        raise ReplayError("bad expression: it is empty")
    if len(text) > MAX_LENGTH:
        raise ReplayError(f"bad expression: longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise ReplayError(f"bad expression {text!r}: {exc.msg} (column {exc.offset})") from None
    except (RecursionError, MemoryError):
        raise ReplayError("bad expression: too deeply nested") from None
    names = set(projection_names)
    roots: dict[str, str] = {}
    # dotted prefixes: "scheduler" -> namespace "scheduler"
    for name in names:
        first = name.split(".", 1)[0]
        roots.setdefault(first, first)
    for name in names:
        if "." not in name:
            roots[name] = name
    shorts: dict[str, list[str]] = {}
    for name in names:
        shorts.setdefault(name.split(".")[-1], []).append(name)
    for short, full in shorts.items():
        if len(full) == 1 and short not in roots:
            roots[short] = full[0]
    try:
        return Expression(text.strip(), tree, roots, names)
    except RecursionError:
        raise ReplayError("bad expression: too deeply nested") from None
