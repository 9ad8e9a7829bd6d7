"""The HTTP edge over a live ``xcore serve``: every refusal is named and 4xx, never 5xx.

One server (module scope) with a trusted plugin whose routes validate float fields, so
the kernel's, the admin API's and a plugin's routes are checked alike: hostile bodies
(``NaN``, ``Infinity``, bytes that are not UTF-8, deep nesting) get a JSON 422, and
``HEAD`` works wherever ``GET`` does, as ``OPTIONS`` says.
"""

from __future__ import annotations

import contextlib
import re
import select
import socket
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.server import Server, serve

TOKEN = "http-edge-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
METHODS = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}

ROUTER = """
from fastapi import APIRouter, Query
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field

router = APIRouter(prefix="/measure", tags=["measure"])


class Reading(BaseModel):
    value: float = Field(ge=0, le=1000)
    label: str = ""


@router.post("/readings")
async def add(reading: Reading) -> dict[str, float]:
    return {"value": reading.value}


@router.get("/readings")
async def readings(scale: float = Query(1.0, gt=0, le=10)) -> dict[str, float]:
    return {"scale": scale}


@router.get("/export")
async def export() -> PlainTextResponse:
    return PlainTextResponse("x" * 64_000_000)
"""


def _plugins(tmp: Path) -> Path:
    # the same routes trusted (in the kernel's app) and sandboxed (in a worker's own app)
    for name, mode in (("measure", "trusted"), ("measuresb", "sandboxed")):
        folder = tmp / "plugins" / name
        folder.mkdir(parents=True)
        (folder / "__init__.py").write_text("")
        (folder / "run.py").write_text(
            f"PLUGIN_INFO = {{'version': '1.0.0', 'Api_prefix': '/app/{name}', "
            f"'tag_for_identified': ['{name}'], 'mode': '{mode}'}}\n"
        )
        router = ROUTER.replace('prefix="/measure"', f'prefix="/{name}"')
        (folder / "router.py").write_text(textwrap.dedent(router))
    return tmp / "plugins"


def _wait_for_the_plugin(s: Server) -> None:
    deadline = time.monotonic() + 120  # the plugins load after the server answers
    for name in ("measure", "measuresb"):
        while httpx.get(f"{s.url}/app/{name}/readings", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, s.output()
            time.sleep(0.05)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("edge")
    with serve(tmp, plugins_dir=_plugins(tmp), env={"XCORE_ADMIN_TOKEN": TOKEN}) as s:
        _wait_for_the_plugin(s)
        yield s
        assert TOKEN not in s.output()


def _refused(r: httpx.Response, where: str) -> list[dict[str, Any]]:
    assert r.status_code == 422, (where, r.status_code, r.text)
    assert r.headers["content-type"] == "application/json", where
    detail = r.json()["detail"]
    assert isinstance(detail, list) and detail, where
    for error in detail:
        assert {"type", "loc", "msg"} <= set(error), (where, error)
    return detail


# (route, body): a float field given a value JSON cannot encode, on an admin route and
# on a plugin route; Python's JSON parser accepts NaN and Infinity, as browsers' do not
NON_FINITE = [
    ("/admin/tokens", '{"name": NaN, "scopes": ["admin:read"]}', "NaN"),
    ("/admin/tokens", '{"name": Infinity, "scopes": ["admin:read"]}', "Infinity"),
    ("/admin/tokens", '{"name": "n", "scopes": [-Infinity]}', "-Infinity"),
    ("/app/measure/readings", '{"value": NaN}', "NaN"),
    ("/app/measure/readings", '{"value": Infinity}', "Infinity"),
    ("/app/measure/readings", '{"value": -Infinity}', "-Infinity"),
    ("/app/measure/readings", '{"value": 1, "label": [NaN, {"x": Infinity}]}', None),
    ("/app/measuresb/readings", '{"value": NaN}', "NaN"),
    ("/app/measuresb/readings", '{"value": -Infinity}', "-Infinity"),
]


def test_a_non_finite_number_in_a_body_is_a_json_422(server: Server) -> None:
    for path, body, echoed in NON_FINITE:
        r = httpx.post(
            server.url + path,
            content=body,
            headers={**AUTH, "content-type": "application/json"},
            timeout=30,
        )
        detail = _refused(r, f"{path} {body}")
        if echoed is not None:  # the value is echoed as the client spelled it
            assert detail[0]["input"] == echoed, (path, body, detail)
    r = httpx.post(
        server.url + "/app/measure/readings",
        content='{"value": 1, "label": [NaN, {"x": Infinity}]}',
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert _refused(r, "nested")[0]["input"] == ["NaN", {"x": "Infinity"}]


def test_bytes_and_deep_input_are_echoed_printable(server: Server) -> None:
    for path in ("/admin/tokens", "/app/measure/readings"):
        # a body of another content type is validated as bytes: these are not UTF-8
        r = httpx.post(
            server.url + path,
            content=b"\xff\xfe\x00 hostile",
            headers={**AUTH, "content-type": "text/plain"},
            timeout=30,
        )
        assert _refused(r, path)[0]["input"] == "\\xff\\xfe\x00 hostile", r.text
        # nesting the parser accepts but an echo must not recurse through
        deep = "[" * 900 + "]" * 900
        r = httpx.post(
            server.url + path,
            content=f'{{"name": {deep}, "label": {deep}, "value": 1, "scopes": ["a"]}}',
            headers={**AUTH, "content-type": "application/json"},
            timeout=30,
        )
        echoed = _refused(r, f"deep {path}")[0]["input"]
        assert r.text.count("[") < 200 and "..." in str(echoed), r.text[:300]
    # a lone surrogate is valid JSON but not UTF-8: in a value, and in a key
    r = httpx.post(
        server.url + "/app/measure/readings",
        content='{"value": "\\ud800"}',
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert _refused(r, "surrogate value")[0]["input"] == "\\ud800"
    r = httpx.post(
        server.url + "/admin/tokens",
        content='{"name": "n", "scopes": ["admin:read"], "\\udfff": 1}',
        headers={**AUTH, "content-type": "application/json"},
        timeout=30,
    )
    assert "\\udfff" in str(_refused(r, "surrogate key")), r.text


def _get_paths(server: Server) -> list[str]:
    spec = httpx.get(server.url + "/openapi.json", headers=AUTH, timeout=30).json()
    return [
        re.sub(r"\{[^}]+\}", "zz", path)
        for path, item in spec["paths"].items()
        if "get" in item and not path.endswith("/stream")  # SSE streams never end
    ]


def test_head_works_wherever_get_does_and_options_lists_it(server: Server) -> None:
    paths = _get_paths(server)
    assert {"/health", "/admin/kernel", "/admin/tokens", "/app/measure/readings"} <= set(paths)
    for path in paths:
        allow = httpx.options(server.url + path, headers=AUTH, timeout=30).headers["allow"]
        assert "HEAD" in allow.split(", "), (path, allow)
        got = httpx.get(server.url + path, headers=AUTH, timeout=30)
        head = httpx.head(server.url + path, headers=AUTH, timeout=30)
        assert head.status_code == got.status_code, (path, head.status_code, got.status_code)
        assert head.content == b"", path
        assert head.headers.get("content-type") == got.headers.get("content-type"), path
    # the head of a stable answer is the GET's, length included
    got = httpx.get(server.url + "/app/measure/readings?scale=2", timeout=30)
    head = httpx.head(server.url + "/app/measure/readings?scale=2", timeout=30)
    assert head.headers["content-length"] == got.headers["content-length"] == str(len(got.content))
    # a HEAD is a read: the same authentication and scope as the GET
    assert httpx.head(server.url + "/admin/kernel", timeout=30).status_code == 401
    wrong = {"Authorization": "Bearer not-the-token-0123456789"}
    assert httpx.head(server.url + "/admin/kernel", headers=wrong, timeout=30).status_code == 401
    writer = httpx.post(
        server.url + "/admin/tokens",
        json={"name": "writer", "scopes": ["admin:write"]},
        headers=AUTH,
        timeout=30,
    )
    assert writer.status_code == 201, writer.text
    only_write = {"Authorization": f"Bearer {writer.json()['token']}"}
    r = httpx.head(server.url + "/admin/kernel", headers=only_write, timeout=30)
    assert r.status_code == 403 and "admin:read" in r.headers["www-authenticate"]
    # a GET that streams without end (server-sent events): HEAD ends with the head, so
    # the keep-alive connection serves the next request
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client:
        for path in ("/admin/events/stream", "/admin/logs/stream", "/admin/events/stream"):
            r = client.head(path)
            assert r.status_code == 200 and r.content == b"", path
            assert r.headers["content-type"].startswith("text/event-stream"), path
            assert client.get("/health/live").status_code == 200, path
    # a path without GET still refuses HEAD, and says what it serves
    r = httpx.head(server.url + "/admin/tokens/0123456789abcdef", headers=AUTH, timeout=30)
    assert r.status_code == 405 and "HEAD" not in r.headers["allow"], r.headers


def test_a_dripped_body_is_answered_408(tmp_path: Path) -> None:
    # each byte comes well within the body timeout, but far below the minimum rate
    env = {
        "XCORE_ADMIN_TOKEN": TOKEN,
        "XCORE_HTTP__BODY_TIMEOUT": "2",
        "XCORE_HTTP__MIN_BODY_RATE": "100",
    }
    with serve(tmp_path, env=env) as s:
        host, port = s.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(
                b"POST /admin/tokens HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Authorization: Bearer {TOKEN}\r\nContent-Length: 1000\r\n\r\n".encode()
            )
            answer = b""
            for _ in range(120):  # 60 s of dripping at most; the rule cuts it after ~2 s
                sock.sendall(b" ")
                readable, _, _ = select.select([sock], [], [], 0.5)
                if readable:
                    break
            sock.settimeout(30)
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(65536):  # the head and the body may come apart
                    answer += chunk
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:300]
        assert b"slower than 100 bytes per second" in answer, answer
        # a body that comes at its own pace, however small its pieces, is read whole
        r = httpx.post(
            s.url + "/admin/tokens",
            content=iter([b'{"name": "slow", ', b'"scopes": ["admin:read"]}']),
            headers={**AUTH, "content-type": "application/json"},
            timeout=30,
        )
        assert r.status_code == 201, r.text


def test_a_client_that_stops_reading_its_answer_is_closed(tmp_path: Path) -> None:
    env = {"XCORE_ADMIN_TOKEN": TOKEN, "XCORE_HTTP__SEND_TIMEOUT": "1"}
    with serve(tmp_path, plugins_dir=_plugins(tmp_path), env=env) as s:
        _wait_for_the_plugin(s)
        host, port = s.url.removeprefix("http://").split(":")
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((host, int(port)))
            # 64 MB asked for, none of it read: far more than the socket buffers hold
            sock.sendall(b"GET /app/measure/export HTTP/1.1\r\nHost: x\r\n\r\n")
            deadline = time.monotonic() + 60
            while "1 not reading their response" not in s.output():
                assert time.monotonic() < deadline, s.output()[-3000:]
                time.sleep(0.2)
            sock.settimeout(30)
            received = 0
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(1 << 20):  # what the buffers held, then the end
                    received += len(chunk)
            assert received < 64_000_000
        assert httpx.get(s.url + "/health/live", timeout=10).status_code == 200
