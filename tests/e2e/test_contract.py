"""The admin API keeps its own contract: checked over a live ``xcore serve``.

Every promise is checked against what a client receives, never against our own code:
the OpenAPI document is fetched from the server and walked (so routes added later are
covered without touching this file), and schemathesis (pinned in pyproject.toml) runs
all its checks, stateful phase included, with bounded examples.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.server import Server, serve

TOKEN = "contract-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REPO = Path(__file__).resolve().parents[2]
CONFIG = Path(__file__).with_name("schemathesis.toml")
METHODS = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}


def _plugins(tmp_path: Path) -> Path:
    plugins = tmp_path / "plugins"
    for name in ("hello", "jobs"):
        shutil.copytree(REPO / "plugins" / name, plugins / name)
    return plugins


def _spec(server: Server, **headers: str) -> dict[str, Any]:
    r = httpx.get(f"{server.url}/openapi.json", headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, op)
        for path, item in spec["paths"].items()
        for method, op in item.items()
        if method in METHODS
    ]


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    return dict(spec["components"]["schemas"][ref.rsplit("/", 1)[1]])


def test_the_document_declares_the_bearer_scheme_and_every_refusal(tmp_path: Path) -> None:
    with serve(tmp_path, plugins_dir=_plugins(tmp_path), env={"XCORE_ADMIN_TOKEN": TOKEN}) as s:
        spec = _spec(s)
    assert spec["components"]["securitySchemes"]["adminToken"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "the admin token: 'Authorization: Bearer <token>'",
    }
    error = spec["components"]["schemas"]["Error"]
    assert error["required"] == ["detail"] and error["additionalProperties"] is True
    admin = [(p, m, op) for p, m, op in _operations(spec) if p.startswith("/admin")]
    assert len(admin) >= 15, [p for p, _, _ in admin]
    undeclared_404: list[str] = []
    for path, method, op in admin:
        where = f"{method.upper()} {path}"
        assert op["security"] == [{"adminToken": []}], where
        for code, response in op["responses"].items():
            if code[0] not in "45":
                continue
            schema = response["content"]["application/json"]["schema"]
            if code == "422":  # a refused outcome, or FastAPI's parameter validation
                assert schema["anyOf"][0] == {"$ref": "#/components/schemas/Error"}, where
                assert schema["anyOf"][1]["$ref"].endswith("/HTTPValidationError"), where
            else:
                assert schema == {"$ref": "#/components/schemas/Error"}, (where, code)
        assert {"401", "413", "503"} <= set(op["responses"]), where
        if "requestBody" in op:  # malformed, and stalled or dripped (the guard's 408)
            assert {"400", "408"} <= set(op["responses"]), where
        if "{" in path and "404" not in op["responses"]:
            undeclared_404.append(where)
    # a path parameter can name nothing: the route says what it answers then
    assert undeclared_404 == [], "declare responses=error_responses(404) on these"
    # no admin operation keeps FastAPI's bare validation schema for a refusal
    for _, _, op in admin:
        assert "ErrorBody" not in str(op)
    assert "ErrorBody" not in spec["components"]["schemas"]


def test_options_and_allow_list_every_method_of_a_path(tmp_path: Path) -> None:
    with serve(tmp_path, plugins_dir=_plugins(tmp_path), env={"XCORE_ADMIN_TOKEN": TOKEN}) as s:
        spec = _spec(s, **AUTH)
        checked = 0
        for template, item in spec["paths"].items():
            path = re.sub(r"\{[^}]+\}", "zz", template)
            expected = {m.upper() for m in item if m in METHODS} | {"OPTIONS"}
            if "GET" in expected:
                expected.add("HEAD")
            r = httpx.options(s.url + path, headers=AUTH, timeout=10)
            assert r.status_code == 204, (template, r.status_code, r.text)
            assert set(r.headers["allow"].split(", ")) == expected, template
            wrong = next(m for m in ("PUT", "PATCH", "DELETE", "POST") if m not in expected)
            r = httpx.request(wrong, s.url + path, headers=AUTH, timeout=10)
            if template.startswith("/admin"):  # plugin routes answer for themselves
                assert r.status_code == 405, (wrong, template, r.status_code)
                assert set(r.headers["allow"].split(", ")) == expected, (wrong, template)
            checked += 1
        assert checked >= 15
        # a path with both a list and an item operation lists both (Starlette alone: GET)
        r = httpx.put(s.url + "/admin/plugins", headers=AUTH, timeout=10)
        assert r.headers["allow"] == "GET, HEAD, OPTIONS, POST"
        # the admin token is required for OPTIONS too
        assert httpx.options(s.url + "/admin/plugins", timeout=10).status_code == 401


def test_private_docs_hide_the_admin_surface_from_anonymous_clients(tmp_path: Path) -> None:
    env = {"XCORE_ADMIN_TOKEN": TOKEN, "XCORE_HTTP__PRIVATE_DOCS": "true"}
    with serve(tmp_path, plugins_dir=_plugins(tmp_path), env=env) as s:
        for path in ("/docs", "/redoc"):
            assert httpx.get(s.url + path, timeout=10).status_code == 401, path
            wrong = {"Authorization": "Bearer wrong-token"}
            assert httpx.get(s.url + path, headers=wrong, timeout=10).status_code == 401
            assert httpx.get(s.url + path, headers=AUTH, timeout=10).status_code == 200, path
        public, full = _spec(s), _spec(s, **AUTH)
        assert not [p for p in public["paths"] if p.startswith("/admin")]
        assert {"/health", "/app/hello/status"} <= set(public["paths"])
        assert "securitySchemes" not in public["components"]
        assert not {"Error", "RoutesTable"} & set(public["components"]["schemas"])
        assert [p for p in full["paths"] if p.startswith("/admin")]
    with serve(tmp_path / "public", env={"XCORE_ADMIN_TOKEN": TOKEN}) as s:
        assert httpx.get(s.url + "/docs", timeout=10).status_code == 200
        assert [p for p in _spec(s)["paths"] if p.startswith("/admin")]


@pytest.mark.slow
@pytest.mark.timeout(600)  # ~30 s alone; the whole API, all phases, on a loaded machine
def test_schemathesis_finds_no_failure_over_a_live_server(tmp_path: Path) -> None:
    cli = Path(sys.executable).with_name("schemathesis")
    assert cli.exists(), "schemathesis is a dev dependency: pip install -e '.[dev]'"
    with serve(tmp_path, plugins_dir=_plugins(tmp_path), env={"XCORE_ADMIN_TOKEN": TOKEN}) as s:
        run = subprocess.run(
            [
                str(cli),
                "--no-color",
                "--config-file",
                str(CONFIG),
                "run",
                f"{s.url}/openapi.json",
                "--checks",
                "all",
                "--phases",
                "examples,coverage,fuzzing,stateful",
                # the kernel's and the admin API's own routes; plugin routes are their
                # authors' contract (and vanish when schemathesis uninstalls a plugin)
                "--include-path-regex",
                "^/(admin|health)(/|$)",
                # Server-Sent Events streams never end by design: a generated request
                # would wait for the timeout (the monitor's tests cover them)
                "--exclude-path-regex",
                "/stream$",
                "--max-examples",
                "12",
                "--seed",
                "7",
                "--workers",
                "1",
                "--generation-database",
                "none",
                "--request-timeout",
                "20",
                "--header",
                f"Authorization: Bearer {TOKEN}",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )
        output = run.stdout + run.stderr
        assert run.returncode == 0, output[-12000:]
        assert "failure" not in output.rsplit("SUMMARY", 1)[-1].lower(), output[-3000:]
        # the stateful phase ran and followed the documented links (list -> item -> action)
        links = re.search(r"API Links:\s+(\d+) covered", output)
        assert links is not None and int(links.group(1)) >= 3, output[:3000]
    assert TOKEN not in s.output()
