"""Scoped tokens: every admin route refuses a token without the needed scope (walked from
the OpenAPI document); revoked and expired tokens are refused; tokens survive a restart."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.e2e.server import serve

TOKEN = "admin-scope-test-token-abcdefgh"
ROOT = {"Authorization": f"Bearer {TOKEN}"}


def _issue(
    url: str, scopes: list[str], headers: dict[str, str] = ROOT, **extra: object
) -> httpx.Response:
    return httpx.post(
        f"{url}/admin/tokens",
        json={"name": "t", "scopes": scopes, **extra},
        headers=headers,
        timeout=10,
    )


def test_every_admin_route_needs_its_scope(tmp_path: Path) -> None:
    with serve(tmp_path, env={"XCORE_ADMIN_TOKEN": TOKEN}) as server:
        reader = _issue(server.url, ["admin:read"]).json()["token"]
        writer = _issue(server.url, ["admin:write"]).json()["token"]
        spec = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
        routes = [
            (method.upper(), path)
            for path, item in spec["paths"].items()
            if path.startswith("/admin")
            for method in item
            if method in {"get", "post", "put", "patch", "delete"}
        ]
        assert ("GET", "/admin/logs") in routes and ("POST", "/admin/tokens") in routes
        assert ("GET", "/admin/events/stream") in routes
        for method, path in routes:
            url = server.url + re.sub(r"\{[^}]+\}", "x", path)
            wrong = writer if method == "GET" else reader
            r = httpx.request(method, url, headers={"Authorization": f"Bearer {wrong}"}, timeout=10)
            assert r.status_code == 403, (method, path, r.status_code, r.text)
            needed = "admin:read" if method == "GET" else "admin:write"
            assert needed in r.json()["detail"]
            assert 'error="insufficient_scope"' in r.headers["www-authenticate"]
        # the right scope gets through the guard (whatever the route answers then)
        ok = httpx.get(
            f"{server.url}/admin/kernel", headers={"Authorization": f"Bearer {reader}"}, timeout=10
        )
        assert ok.status_code == 200
    assert reader not in server.output() and writer not in server.output()


def test_revoked_expired_and_escalating_tokens_are_refused_and_tokens_survive_a_restart(
    tmp_path: Path,
) -> None:
    env = {"XCORE_ADMIN_TOKEN": TOKEN}
    with serve(tmp_path, env=env) as server:
        body = _issue(server.url, ["admin:read"]).json()
        reader, reader_id = body["token"], body["id"]
        as_reader = {"Authorization": f"Bearer {reader}"}
        assert body["scopes"] == ["admin:read"] and body["active"]
        short = _issue(server.url, ["admin:read"], expires_in=0.5).json()["token"]
        writer = _issue(server.url, ["admin:write"]).json()["token"]
        # a token cannot mint a stronger one
        r = _issue(server.url, ["admin:read", "admin:write"], {"Authorization": f"Bearer {writer}"})
        assert r.status_code == 403 and "admin:read" in r.json()["detail"]
        # strict input: unknown field, bad scope, no scopes
        for payload, field in (
            ({"name": "x", "scopes": ["admin:read"], "bogus": 1}, "bogus"),
            ({"name": "x", "scopes": ["bad scope"]}, "scopes"),
            ({"name": "x", "scopes": []}, "scopes"),
            ({"name": "x", "scopes": ["admin:read"], "expires_in": -1}, "expires_in"),
        ):
            r = httpx.post(f"{server.url}/admin/tokens", json=payload, headers=ROOT, timeout=10)
            assert r.status_code == 422 and any(field in e["loc"] for e in r.json()["detail"]), (
                r.text
            )
        time.sleep(0.6)
        r = httpx.get(
            f"{server.url}/admin/kernel", headers={"Authorization": f"Bearer {short}"}, timeout=10
        )
        assert r.status_code == 401
        assert (
            httpx.get(f"{server.url}/admin/kernel", headers=as_reader, timeout=10).status_code
            == 200
        )
        # the CLI lists and revokes
        cli = [sys.executable, "-m", "kernel.cli", "token", "--url", server.url, "--token", TOKEN]
        listed = subprocess.run([*cli, "list"], capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0 and reader_id in listed.stdout, listed.stderr
        revoked = subprocess.run(
            [*cli, "revoke", reader_id], capture_output=True, text=True, timeout=60
        )
        assert revoked.returncode == 0, revoked.stderr
        assert (
            httpx.get(f"{server.url}/admin/kernel", headers=as_reader, timeout=10).status_code
            == 401
        )
        created = subprocess.run(
            [*cli, "create", "--name", "ci", "--scope", "admin:read", "--expires", "1h"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert created.returncode == 0, created.stderr
        cli_token = created.stdout.strip()
        assert cli_token.startswith("xct_")
        # creation and revocation are events: the audit trail
        events = httpx.get(
            f"{server.url}/admin/events",
            params={"stream": "admin-tokens"},
            headers=ROOT,
            timeout=10,
        ).json()["events"]
        assert [e["type"] for e in events].count("TokenRevoked") == 1
        assert all(reader not in str(e) for e in events)
    with serve(tmp_path, env=env) as server:
        for token, expected in ((cli_token, 200), (reader, 401), (writer, 403)):
            r = httpx.get(
                f"{server.url}/admin/kernel",
                headers={"Authorization": f"Bearer {token}"},
                timeout=10,
            )
            assert r.status_code == expected, (token[:8], r.status_code)


def test_a_non_finite_expiry_is_a_422_not_a_500(tmp_path: Path) -> None:
    """Python's JSON parser takes NaN and Infinity; the 422 used to echo them back as its
    "input", which JSON cannot encode, so the answer was a 500."""
    with serve(tmp_path, env={"XCORE_ADMIN_TOKEN": TOKEN}) as server:
        for value in ("NaN", "Infinity", "-Infinity"):
            r = httpx.post(
                f"{server.url}/admin/tokens",
                content=f'{{"name": "t", "scopes": ["admin:read"], "expires_in": {value}}}',
                headers={**ROOT, "content-type": "application/json"},
                timeout=10,
            )
            assert r.status_code == 422, (value, r.status_code, r.text)
            assert r.json()["detail"][0]["loc"] == ["body", "expires_in"]
        assert httpx.get(f"{server.url}/admin/tokens", headers=ROOT, timeout=10).json() == []
