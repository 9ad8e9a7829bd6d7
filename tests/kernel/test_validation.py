"""The validation answer's echo: always encodable, always bounded (live tests: tests/e2e)."""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from kernel.validation import DEEPER, MAX_CHARS, MAX_DEPTH, MAX_ITEMS, install, printable


def test_every_value_becomes_plain_json() -> None:
    value = {
        "nan": math.nan,
        "inf": [math.inf, -math.inf],
        b"\xff": bytearray(b"\xfe"),
        "\ud800": {1, 2},
        "other": object,
        ("a", 1): None,
    }
    out = printable(value)
    text = json.dumps(out, allow_nan=False, ensure_ascii=False).encode("utf-8")
    assert json.loads(text) == {
        "nan": "NaN",
        "inf": ["Infinity", "-Infinity"],
        "\\xff": "\\xfe",
        "\\ud800": [1, 2],
        "other": "<class 'object'>",
        "('a', 1)": None,
    }


def test_the_echo_is_bounded_in_depth_items_and_characters() -> None:
    deep: Any = 1
    for _ in range(100_000):  # far past the interpreter's recursion limit
        deep = [deep]
    out = printable(deep)
    depth = 0
    while isinstance(out, list):
        out, depth = out[0], depth + 1
    assert depth == MAX_DEPTH and out == DEEPER
    assert len(printable(list(range(10 * MAX_ITEMS)))) == MAX_ITEMS + 1
    assert len(printable({str(i): i for i in range(10 * MAX_ITEMS)})) == MAX_ITEMS + 1
    assert len(printable("x" * (10 * MAX_CHARS))) < MAX_CHARS + 100


class _Body(BaseModel):
    x: float = Field(ge=0)


async def test_an_app_s_own_handler_is_kept() -> None:
    async def own(request: Any, exc: Exception) -> JSONResponse:
        return JSONResponse({"mine": True}, status_code=400)

    app = FastAPI(exception_handlers={RequestValidationError: own})
    assert install(app) is False
    plain = FastAPI()

    @plain.post("/x")
    async def x(body: _Body) -> float:
        return body.x

    assert install(plain) is True
    transport = httpx.ASGITransport(app=plain)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.post(
            "/x", content=b'{"x": -Infinity}', headers={"content-type": "application/json"}
        )
    assert r.status_code == 422 and r.json()["detail"][0]["input"] == "-Infinity"
