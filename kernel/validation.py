"""A request that fails validation is always answered with a JSON 422, never a 500.

Guarantee, for every route the kernel's app serves (kernel, services, admin API, and the
routes of trusted plugins, which run inside that app): a ``RequestValidationError`` gets
``422 {"detail": [{"type", "loc", "msg", "input", "ctx"?}, ...]}``, FastAPI's own
shape (``HTTPValidationError`` in the OpenAPI document), whatever the offending input is.

FastAPI's default answer echoes each error's ``input`` and encodes it with a JSON
encoder that refuses what a request can legally carry: ``NaN`` and ``Infinity`` (Python's
JSON parser accepts them, JSON cannot encode them), bytes that are not UTF-8 (a body
sent with another content type is validated as bytes) and lone surrogates
(``"\\ud800"`` is valid JSON, but not encodable as UTF-8), in an input or in a key
that the location names. Each became a 500.

Mechanism: :func:`validation_answer` rebuilds each error from plain JSON values, walking
the echoed input with an explicit stack and a depth bound (a 900-level array cannot
exhaust the interpreter's stack): non-finite numbers become the strings ``"NaN"``,
``"Infinity"`` and ``"-Infinity"`` (the spelling the client sent), bytes are decoded and
lone surrogates encoded with ``backslashreplace`` (an invalid byte is shown as ``\\xff``),
anything else unknown becomes its ``str``; long strings and long lists are cut.
:func:`install` registers it on an app in place of FastAPI's default; an app that
registered a handler of its own keeps it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.types import ASGIApp

__all__ = ["install", "printable", "validation_answer"]

log = logging.getLogger("xcore.http")

#: Nesting kept in an echoed input; deeper values are replaced by a marker.
MAX_DEPTH = 32
#: Items kept per echoed list or object (the rest are summarized by a marker).
MAX_ITEMS = 100
#: Characters kept per echoed string.
MAX_CHARS = 4096
DEEPER = "..."


def _scalar(value: Any) -> Any:
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, bytes | bytearray | memoryview):
        value = bytes(value).decode("utf-8", "backslashreplace")
    elif not isinstance(value, str):
        value = str(value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800" in JSON): shown escaped
        value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(value) > MAX_CHARS:
        return value[:MAX_CHARS] + f"... ({len(value) - MAX_CHARS} more characters)"
    return value


def printable(value: Any) -> Any:
    """``value`` as plain JSON values that any JSON encoder accepts (see above)."""
    root: list[Any] = [None]
    # (container, key, value, depth): put printable(value) at container[key]
    todo: list[tuple[Any, Any, Any, int]] = [(root, 0, value, 0)]
    while todo:
        container, key, item, depth = todo.pop()
        if isinstance(item, dict | list | tuple | set | frozenset):
            if depth >= MAX_DEPTH:
                container[key] = DEEPER
                continue
            if isinstance(item, dict):
                out: Any = {}
                pairs = list(item.items())
                for k, v in pairs[:MAX_ITEMS]:
                    name = _scalar(k)
                    name = name if isinstance(name, str) else str(name)
                    out[name] = None
                    todo.append((out, name, v, depth + 1))
                if len(pairs) > MAX_ITEMS:
                    out[DEEPER] = f"{len(pairs) - MAX_ITEMS} more"
            else:
                items = list(item)
                out = [None] * min(len(items), MAX_ITEMS)
                for i, v in enumerate(items[:MAX_ITEMS]):
                    todo.append((out, i, v, depth + 1))
                if len(items) > MAX_ITEMS:
                    out.append(f"{DEEPER} {len(items) - MAX_ITEMS} more")
            container[key] = out
        else:
            container[key] = _scalar(item)
    return root[0]


def _errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    answer = []
    for error in errors:
        if not isinstance(error, dict):
            answer.append({"type": "value_error", "loc": [], "msg": str(printable(error))})
            continue
        # a location names the client's keys, and a message may quote its input
        entry: dict[str, Any] = {
            "type": str(_scalar(error.get("type", "value_error"))),
            "loc": [p if isinstance(p, int) else str(_scalar(p)) for p in error.get("loc", ())],
            "msg": str(_scalar(error.get("msg", ""))),
        }
        if "input" in error:
            entry["input"] = printable(error["input"])
        if error.get("ctx"):
            entry["ctx"] = printable(error["ctx"])
        answer.append(entry)
    return answer


def validation_answer(exc: RequestValidationError) -> JSONResponse:
    """The 422 answering ``exc``: FastAPI's shape, every value made encodable."""
    try:
        detail = _errors(exc.errors())
    except Exception:  # never a 500 for a refusal: say less, but say it
        log.exception("a validation error could not be described; answering without detail")
        detail = [{"type": "value_error", "loc": [], "msg": "the request is invalid"}]
    return JSONResponse(status_code=422, content={"detail": detail})


async def _handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return validation_answer(exc)


def install(app: FastAPI) -> bool:
    """Answer ``app``'s validation errors with :func:`validation_answer`.

    Returns False, changing nothing, when the app registered a handler of its own. Takes
    effect on a running app too (its built middleware stack is updated in place).
    """
    current = app.exception_handlers.get(RequestValidationError)
    if current is not None and current not in (request_validation_exception_handler, _handler):
        return False
    app.exception_handlers[RequestValidationError] = _handler
    if app.middleware_stack is not None:
        stack: ASGIApp | None = app.middleware_stack
        seen = 0
        while stack is not None and seen < 100:
            if isinstance(stack, ExceptionMiddleware):  # its handlers are read per request
                stack.add_exception_handler(RequestValidationError, _handler)
                return True
            stack = getattr(stack, "app", None)
            seen += 1
        log.warning(
            "the app's middleware stack was built before the kernel started and hides its "
            "exception middleware: validation errors keep FastAPI's default answer"
        )
    return True
