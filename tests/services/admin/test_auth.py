"""Every /admin route refuses a missing or wrong token (walked from the OpenAPI document)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from tests.e2e.server import serve

TOKEN = "admin-test-token-abcdefghijklmnop"


def test_every_admin_route_refuses_a_missing_or_wrong_token(tmp_path: Path) -> None:
    with serve(tmp_path, env={"XCORE_ADMIN_TOKEN": TOKEN}) as server:
        spec = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
        routes = [
            (method.upper(), path)
            for path, item in spec["paths"].items()
            if path.startswith("/admin")
            for method in item
            if method in {"get", "post", "put", "patch", "delete"}
        ]
        assert len(routes) >= 3, routes
        for method, path in routes:
            url = server.url + re.sub(r"\{[^}]+\}", "x", path)
            for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": TOKEN}):
                r = httpx.request(method, url, headers=headers, timeout=10)
                assert r.status_code == 401, (method, path, headers, r.status_code, r.text)
                assert r.headers["www-authenticate"].startswith("Bearer")
        # and the right token gets through
        ok = httpx.get(
            f"{server.url}/admin/kernel", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
        )
        assert ok.status_code == 200
    assert TOKEN not in server.output()
