"""The same router served by a bare FastAPI app and by xcore as a sandboxed plugin
answers the same requests the same way (status, body, the headers the app sets)."""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from tests.services.sandbox.conftest import sandboxed, write_plugin

ROUTER = """
    from typing import Annotated
    from fastapi import APIRouter, Cookie, Header, HTTPException, Query, Response
    from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse
    from pydantic import BaseModel

    router = APIRouter()

    class Item(BaseModel):
        name: str
        price: float
        tags: list[str] = []

    @router.get("/items/{item_id}")
    async def read(item_id: int, q: str | None = None, many: Annotated[list[int], Query()] = []):
        return {"id": item_id, "q": q, "many": many}

    @router.post("/items", status_code=201)
    async def create(item: Item):
        return item

    @router.put("/items/{item_id}")
    def replace(item_id: int, item: Item, x_token: Annotated[str | None, Header()] = None):
        return {"id": item_id, "item": item, "token": x_token}

    @router.delete("/items/{item_id}", status_code=204)
    async def delete(item_id: int):
        return Response(status_code=204)

    @router.get("/missing")
    async def missing():
        raise HTTPException(404, "nothing here", headers={"x-why": "gone"})

    @router.get("/text")
    async def text():
        return PlainTextResponse("plain ü text", headers={"x-a": "1"})

    @router.get("/redirect")
    async def redirect():
        return RedirectResponse("/somewhere", status_code=307)

    @router.get("/cookie")
    async def cookie(session: Annotated[str | None, Cookie()] = None):
        response = JSONResponse({"session": session})
        response.set_cookie("next", "v2")
        response.set_cookie("other", "v3")
        return response
"""

REQUESTS: list[tuple[str, str, dict[str, Any]]] = [
    ("GET", "/items/3?q=hi&many=1&many=2", {}),
    ("GET", "/items/notanint", {}),
    ("POST", "/items", {"json": {"name": "a", "price": 1.5, "tags": ["x"]}}),
    ("POST", "/items", {"json": {"name": "a"}}),
    ("POST", "/items", {"content": b"{broken", "headers": {"content-type": "application/json"}}),
    ("PUT", "/items/9", {"json": {"name": "b", "price": 2}, "headers": {"x-token": "t"}}),
    ("DELETE", "/items/9", {}),
    ("GET", "/missing", {}),
    ("GET", "/text", {}),
    ("GET", "/redirect", {}),
    ("GET", "/cookie", {"headers": {"cookie": "session=abc"}}),
    ("PATCH", "/items/1", {}),
]
#: x-request-id: the kernel's dispatcher echoes one on every plugin answer
IGNORED = {"date", "server", "content-length", "x-request-id", "content-security-policy"}


def _headers(r: httpx.Response, ignored: set[str]) -> list[tuple[str, str]]:
    return sorted((k, v) for k, v in r.headers.multi_items() if k not in ignored)


def bare_app(tmp: Path) -> FastAPI:
    source = tmp / "bare_router.py"
    source.write_text(textwrap.dedent(ROUTER))
    spec = importlib.util.spec_from_file_location("bare_router", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    app = FastAPI()
    app.include_router(module.router, prefix="/app/diff")
    return app


async def test_a_sandboxed_router_answers_like_a_bare_app(harness: Any, tmp_path: Path) -> None:
    h = await harness("rlimits")
    write_plugin(h.plugins, "diff", info=sandboxed("diff"), router=ROUTER)
    assert (await h.reload("diff")).status_code == 200
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=bare_app(tmp_path)), base_url="http://test"
    ) as bare:
        for method, path, kwargs in REQUESTS:
            want = await bare.request(method, "/app/diff" + path, **kwargs)
            got = await h.client.request(method, "/app/diff" + path, **kwargs)
            where = f"{method} {path}"
            assert got.status_code == want.status_code, (where, got.text, want.text)
            assert got.content == want.content, where
            # a 405's Allow lists every method of the path in xcore (kernel/guard.py),
            # only the first route's in a bare app
            ignored = IGNORED | ({"allow"} if want.status_code == 405 else set())
            assert _headers(got, ignored) == _headers(want, ignored), where
            # a sandboxed plugin's documents get an origin of their own (services/sandbox/
            # proxy.py): added to whatever policy the plugin sets itself
            policies = got.headers.get_list("content-security-policy")
            assert any(
                p.startswith("sandbox ") and "allow-same-origin" not in p for p in policies
            ), where
            assert set(want.headers.get_list("content-security-policy")) <= set(policies), where
            if want.status_code == 405:
                allowed = set(got.headers["allow"].split(", "))
                assert set(want.headers["allow"].split(", ")) <= allowed, where
