"""The same router, served by xcore and by a bare FastAPI app, answers the same.

Both run as real servers (``xcore serve`` and ``uvicorn`` on a plain ``FastAPI()`` that
includes the router under the same prefix). Every request below goes to both; status,
content type, location and body must match. What a plugin author writes for a bare app
(parameters, bodies, forms and files, dependencies with ``yield``, security schemes,
streaming, redirects, ``url_for``, sub-routers, the router's own lifespan) must work
unchanged. Behind a proxy (both served by uvicorn with ``--root-path``) the URLs routes
build and the OpenAPI document (``servers``, paths, methods) match too.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.server import free_port, serve

PREFIX = "/app/diff"

ROUTER = """
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import (
    APIRouter, Cookie, Depends, File, Form, Header, HTTPException, Query, Request, Security,
    UploadFile, WebSocket,
)
from fastapi.responses import PlainTextResponse, RedirectResponse, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field


@asynccontextmanager
async def lifespan(app):
    yield {"started": "yes"}


router = APIRouter(lifespan=lifespan)
bearer = HTTPBearer(auto_error=False)
api_key = APIKeyHeader(name="X-Key", auto_error=False)


class Item(BaseModel):
    name: str = Field(min_length=1)
    price: float
    tags: list[str] = []


def common(q: str | None = None, limit: int = Query(10, le=100)):
    return {"q": q, "limit": limit}


def session():
    state = {"open": True}
    try:
        yield state
    finally:
        state["open"] = False


@router.get("/items/{item_id}")
async def read_item(item_id: int, c: Annotated[dict, Depends(common)]):
    return {"item_id": item_id, **c}


@router.post("/items", status_code=201)
async def create_item(item: Item, s: Annotated[dict, Depends(session)]):
    return {"item": item.model_dump(), "session": s["open"]}


@router.put("/items/{item_id}")
def replace_item(item_id: int, item: Item, x_token: Annotated[str | None, Header()] = None):
    return {"item_id": item_id, "name": item.name, "token": x_token}


@router.post("/form")
async def form(user: Annotated[str, Form()], upload: Annotated[UploadFile, File()]):
    data = await upload.read()
    return {"user": user, "filename": upload.filename, "size": len(data)}


@router.get("/cookie")
async def cookie(flavour: Annotated[str | None, Cookie()] = None):
    return {"flavour": flavour}


@router.get("/secure")
async def secure(creds: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]):
    if creds is None:
        raise HTTPException(401, "no token")
    return {"scheme": creds.scheme, "token": creds.credentials}


@router.get("/key")
async def key(k: Annotated[str | None, Security(api_key)]):
    if k != "sesame":
        raise HTTPException(403, "bad key")
    return {"ok": True}


@router.get("/stream")
async def stream():
    async def chunks():
        for i in range(5):
            yield f"chunk {i}\\n"
    return StreamingResponse(chunks(), media_type="text/plain")


@router.get("/plain", response_class=PlainTextResponse)
async def plain():
    return "hello"


@router.get("/go")
async def go(request: Request):
    return RedirectResponse(request.url_for("read_item", item_id=7), status_code=307)


@router.get("/where")
async def where(request: Request):
    return {"url": str(request.url_for("plain")), "state": request.state.started}


@router.websocket("/ws/{room}")
async def ws(websocket: WebSocket, room: str, token: str | None = None):
    if token != "ok":
        await websocket.close(code=4401)
        return
    await websocket.accept()
    while True:
        text = await websocket.receive_text()
        if text == "bye":
            await websocket.close(code=1000)
            return
        await websocket.send_json({"room": room, "echo": text})


sub = APIRouter(prefix="/sub", tags=["sub"])


@sub.get("/leaf/{name}")
async def leaf(name: str):
    return {"leaf": name}


router.include_router(sub)
"""

CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("GET", "/items/3", {}),
    ("GET", "/items/3?q=x&limit=5", {}),
    ("GET", "/items/3?limit=500", {}),
    ("GET", "/items/abc", {}),
    ("POST", "/items", {"json": {"name": "a", "price": 1.5, "tags": ["t"]}}),
    ("POST", "/items", {"json": {"name": "", "price": "nope"}}),
    ("POST", "/items", {"content": b"not json", "headers": {"content-type": "application/json"}}),
    ("PUT", "/items/9", {"json": {"name": "b", "price": 2}, "headers": {"x-token": "tk"}}),
    ("DELETE", "/items/9", {}),
    ("POST", "/form", {"data": {"user": "ada"}, "files": {"upload": ("f.txt", b"12345")}}),
    ("POST", "/form", {"data": {"user": "ada"}}),
    ("GET", "/cookie", {"cookies": {"flavour": "choc"}}),
    ("GET", "/secure", {}),
    ("GET", "/secure", {"headers": {"authorization": "Bearer abc"}}),
    ("GET", "/key", {"headers": {"x-key": "sesame"}}),
    ("GET", "/key", {"headers": {"x-key": "wrong"}}),
    ("GET", "/stream", {}),
    ("GET", "/plain", {}),
    ("GET", "/go", {}),
    ("GET", "/where", {}),
    ("GET", "/sub/leaf/x", {}),
    ("GET", "/nope", {}),
    ("GET", "/items/3/", {}),
]


@contextmanager
def bare_app(tmp_path: Path, root_path: str = "") -> Iterator[str]:
    folder = tmp_path / "bare"
    folder.mkdir()
    (folder / "diffrouter.py").write_text(ROUTER)
    (folder / "bareapp.py").write_text(
        "from fastapi import FastAPI\nfrom diffrouter import router\n"
        f"app = FastAPI()\napp.include_router(router, prefix={PREFIX!r})\n"
    )
    with _uvicorn(tmp_path, folder, "bareapp:app", root_path) as url:
        yield url


@contextmanager
def xcore_app(tmp_path: Path, plugins: Path, root_path: str) -> Iterator[str]:
    """The kernel's app served by plain uvicorn (``--root-path``: behind a proxy)."""
    folder = tmp_path / "xcoreapp"
    folder.mkdir()
    (folder / "xcoreapp.py").write_text(
        "from kernel import Kernel, Settings\nfrom kernel.http import create_app\n"
        f"kernel = Kernel(Settings(data_dir={str(tmp_path / 'var')!r}, "
        f"plugins_dir={str(plugins)!r}, admin_token='e2e-admin-token-0123456789', "
        "reload=False))\napp = create_app(kernel)\n"
    )
    with _uvicorn(tmp_path, folder, "xcoreapp:app", root_path) as url:
        # the plugin is mounted once its route answers
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}{PREFIX}/plain", timeout=5).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the plugin was not mounted within 60 s")
            time.sleep(0.1)
        yield url


@contextmanager
def _uvicorn(tmp_path: Path, folder: Path, target: str, root_path: str) -> Iterator[str]:
    port = free_port()
    log = (tmp_path / f"{folder.name}.log").open("wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("XCORE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(folder), str(Path(__file__).parents[2])])
    args = ["--root-path", root_path] if root_path else []
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            target,
            "--port",
            str(port),
            "--log-level",
            "warning",
            *args,
        ],
        cwd=folder,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{url}/docs", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError((tmp_path / f"{folder.name}.log").read_text()) from None
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _answer(client: httpx.Client, base: str, method: str, path: str, kw: dict[str, Any]) -> Any:
    kw = dict(kw)
    cookies = kw.pop("cookies", None)
    if cookies:
        kw.setdefault("headers", {})["cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
    r = client.request(method, base + PREFIX + path, **kw)
    location = r.headers.get("location", "").replace(base, "<base>")
    body = r.text.replace(base, "<base>")
    return (r.status_code, r.headers.get("content-type"), location, body)


def test_xcore_serves_a_router_as_a_bare_fastapi_app_does(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    folder = plugins / "diff"
    folder.mkdir(parents=True)
    (folder / "run.py").write_text(
        f"PLUGIN_INFO = {{'version': '1.0.0', 'api_prefix': {PREFIX!r}}}\n"
    )
    (folder / "router.py").write_text(ROUTER)
    env = {"XCORE_ADMIN_TOKEN": "e2e-admin-token-0123456789"}
    with (
        serve(tmp_path, plugins_dir=plugins, env=env, args=("--no-reload",)) as server,
        bare_app(tmp_path) as bare,
        httpx.Client(timeout=10, follow_redirects=False) as client,
    ):
        mismatches = []
        for method, path, kw in CASES:
            ours = _answer(client, server.url, method, path, kw)
            theirs = _answer(client, bare, method, path, kw)
            if ours != theirs:
                mismatches.append(f"{method} {path}:\n  xcore: {ours}\n  bare:  {theirs}")
        echoed = asyncio.run(_ws(server.url, *WS_CASES[0]))
        assert echoed[:2] == [{"room": "lobby", "echo": "hi"}, {"room": "lobby", "echo": "there"}]
        for query, messages in WS_CASES:
            ours = asyncio.run(_ws(server.url, query, messages))
            theirs = asyncio.run(_ws(bare, query, messages))
            if ours != theirs:
                mismatches.append(f"WS {query} {messages}:\n  xcore: {ours}\n  bare:  {theirs}")
        assert not mismatches, "\n".join(mismatches)


#: Requests whose answer depends on ``root_path`` (URLs the app builds).
ROOT_PATH_CASES = [
    case for case in CASES if case[1] in ("/go", "/where", "/items/3", "/sub/leaf/x", "/nope")
]


def _operations(schema: dict[str, Any]) -> dict[str, list[str]]:
    """The app's own paths and methods in an OpenAPI document (the kernel's left out)."""
    return {
        path: sorted(item)
        for path, item in schema.get("paths", {}).items()
        if path.startswith(PREFIX)
    }


def test_behind_a_proxy_root_path_xcore_matches_a_bare_app(tmp_path: Path) -> None:
    """Served with ``--root-path`` (a proxy strips ``/proxy``): the URLs a route builds
    (redirects, ``url_for``), its routing and the OpenAPI document (``servers``, paths)
    are those of a bare app behind the same proxy."""
    root = "/proxy"
    plugins = tmp_path / "plugins"
    folder = plugins / "diff"
    folder.mkdir(parents=True)
    (folder / "run.py").write_text(
        f"PLUGIN_INFO = {{'version': '1.0.0', 'api_prefix': {PREFIX!r}}}\n"
    )
    (folder / "router.py").write_text(ROUTER)
    with (
        xcore_app(tmp_path, plugins, root) as server,
        bare_app(tmp_path, root) as bare,
        httpx.Client(timeout=10, follow_redirects=False) as client,
    ):
        mismatches = []
        for method, path, kw in ROOT_PATH_CASES:
            ours = _answer(client, server, method, path, kw)
            theirs = _answer(client, bare, method, path, kw)
            if ours != theirs:
                mismatches.append(f"{method} {path}:\n  xcore: {ours}\n  bare:  {theirs}")
        go = _answer(client, server, "GET", "/go", {})
        assert go[2] == f"<base>{root}{PREFIX}/items/7", go  # (not a vacuous match)
        ours_doc = client.get(f"{server}/openapi.json").json()
        theirs_doc = client.get(f"{bare}/openapi.json").json()
        assert ours_doc.get("servers") == theirs_doc.get("servers") == [{"url": root}]
        assert _operations(ours_doc) == _operations(theirs_doc)
        assert len(_operations(ours_doc)) >= 10
        assert not mismatches, "\n".join(mismatches)


WS_CASES: list[tuple[str, list[str]]] = [
    ("/ws/lobby?token=ok", ["hi", "there", "bye"]),
    ("/ws/lobby?token=no", ["hi"]),
    ("/ws/other?token=ok", ["x"]),
    ("/ws/nope/extra?token=ok", ["x"]),
]


async def _ws(base: str, query: str, messages: list[str]) -> list[Any]:
    import websockets

    url = "ws" + base.removeprefix("http") + PREFIX + query
    seen: list[Any] = []
    try:
        async with websockets.connect(url, open_timeout=10, close_timeout=5) as conn:
            for text in messages:
                await conn.send(text)
                try:
                    seen.append(json.loads(await asyncio.wait_for(conn.recv(), 10)))
                except websockets.ConnectionClosed as exc:
                    seen.append(("closed", exc.rcvd.code if exc.rcvd else None))
                    break
    except websockets.InvalidStatus as exc:
        seen.append(("refused", exc.response.status_code))
    except websockets.ConnectionClosed as exc:
        seen.append(("closed", exc.rcvd.code if exc.rcvd else None))
    return seen
