"""Plugin routes protected from the manifest: API tokens and OAuth2 JWTs, checked by the
dispatcher before the plugin runs; the security schemes are in /openapi.json."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import APIRouter

from tests.services.monitor.conftest import AUTH, monitored

pytestmark = pytest.mark.anyio

SECRET = "an-hs256-secret-of-at-least-32-characters!"
AUTH_SPEC = {
    "scopes": ["orders:read"],
    "routes": {"POST /app/orders/items": ["orders:write"], "/app/orders/ping": []},
}
calls: list[str] = []


def _orders() -> APIRouter:
    router = APIRouter(prefix="/orders")

    @router.get("/items")
    async def items() -> list[int]:
        calls.append("items")
        return [1, 2]

    @router.post("/items")
    async def add() -> dict[str, bool]:
        calls.append("add")
        return {"added": True}

    @router.get("/ping")
    async def ping() -> str:
        return "pong"

    return router


def _hs(claims: dict[str, Any], key: str = SECRET) -> str:
    base = {
        "iss": "https://issuer.test",
        "aud": "xcore-api",
        "exp": time.time() + 300,
        "sub": "ada",
    }
    return jwt.encode({**base, **claims}, key, algorithm="HS256")


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_jwt_and_api_tokens_guard_plugin_routes(tmp_path: Path) -> None:
    jwt_settings = {
        "secret": SECRET,
        "issuer": "https://issuer.test",
        "audience": "xcore-api",
        "leeway": 5,
    }
    async with monitored(tmp_path, router={"auth": {"jwt": jwt_settings}}) as m:
        await m.load("orders", _orders(), "/app", auth=AUTH_SPEC)
        c = m.client
        calls.clear()
        # no token, and tokens that must be refused: nothing reaches the plugin
        r = await c.get("/app/orders/items")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        for token, why in (
            (_hs({"scope": "orders:read", "exp": time.time() - 60}), "expired"),
            (
                _hs({"scope": "orders:read"}, key="another-secret-of-at-least-32-characters"),
                "signature",
            ),
            (_hs({"scope": "orders:read", "aud": "someone-else"}), "audience"),
            (_hs({"scope": "orders:read", "iss": "https://evil.test"}), "issuer"),
            (
                jwt.encode(
                    {"scope": "orders:read", "aud": "xcore-api", "iss": "https://issuer.test"},
                    SECRET,
                ),
                "exp",
            ),
            ("not-a-token", "unknown"),
        ):
            r = await c.get("/app/orders/items", headers=_bearer(token))
            assert r.status_code == 401, (why, r.status_code, r.text)
            assert 'error="invalid_token"' in r.headers["www-authenticate"], why
        # within the clock skew, an expired token still passes
        r = await c.get(
            "/app/orders/items",
            headers=_bearer(_hs({"scope": "orders:read", "exp": time.time() - 2})),
        )
        assert r.status_code == 200
        assert calls == ["items"]
        # a valid token without the scope: 403 naming it
        reader = _hs({"scope": "orders:read"})
        r = await c.post("/app/orders/items", headers=_bearer(reader))
        assert r.status_code == 403 and "orders:write" in r.json()["detail"]
        assert 'error="insufficient_scope"' in r.headers["www-authenticate"]
        # an identity provider's literal "*" scope is not xcore's every-scope
        star = _hs({"scope": "* orders:read"})
        assert (await c.post("/app/orders/items", headers=_bearer(star))).status_code == 403
        writer = _hs({"scp": ["orders:read", "orders:write"]})
        assert (await c.post("/app/orders/items", headers=_bearer(writer))).status_code == 200
        # a public route of a protected plugin
        assert (await c.get("/app/orders/ping")).status_code == 200
        # the admin token holds every scope; an API token holds its own
        assert (await c.post("/app/orders/items", headers=AUTH)).status_code == 200
        issued = await c.post(
            "/admin/tokens", json={"name": "app", "scopes": ["orders:read"]}, headers=AUTH
        )
        api = issued.json()["token"]
        assert (await c.get("/app/orders/items", headers=_bearer(api))).status_code == 200
        assert (await c.post("/app/orders/items", headers=_bearer(api))).status_code == 403
        # Swagger's Authorize button: schemes and per-operation security
        spec = (await c.get("/openapi.json")).json()
        schemes = spec["components"]["securitySchemes"]
        assert (
            schemes["bearerToken"]["scheme"] == "bearer"
            and schemes["oauth2Jwt"]["bearerFormat"] == "JWT"
        )
        items = spec["paths"]["/app/orders/items"]
        assert items["post"]["security"][0] == {"bearerToken": ["orders:write"]}
        assert items["get"]["security"][1] == {"oauth2Jwt": ["orders:read"]}
        assert "security" not in spec["paths"]["/app/orders/ping"]["get"]


async def test_es256_tokens_verified_with_a_jwks_file(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    other = ec.generate_private_key(ec.SECP256R1())
    public = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**public, "kid": "k1", "use": "sig", "alg": "ES256"}]}))
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    settings = {"algorithms": ["ES256"], "jwks_file": str(jwks), "audience": "xcore-api"}
    async with monitored(tmp_path / "k", router={"auth": {"jwt": settings}}) as m:
        await m.load("orders", _orders(), "/app", auth=["orders:read"])
        claims = {"aud": "xcore-api", "exp": time.time() + 60, "scope": "orders:read"}
        good = jwt.encode(claims, pem, algorithm="ES256", headers={"kid": "k1"})
        bad = jwt.encode(claims, other, algorithm="ES256", headers={"kid": "k1"})
        hs = jwt.encode(claims, "x" * 40, algorithm="HS256")
        assert (await m.client.get("/app/orders/items", headers=_bearer(good))).status_code == 200
        assert (await m.client.get("/app/orders/items", headers=_bearer(bad))).status_code == 401
        assert (await m.client.get("/app/orders/items", headers=_bearer(hs))).status_code == 401


def test_bad_auth_in_a_manifest_is_refused_naming_the_key() -> None:
    from services.loader.manifest import ManifestError, parse_manifest

    for auth, text in (
        ({"scopes": ["a"], "rutes": {}}, "unknown key 'rutes'"),
        ({"routes": {"FETCH /x": ["a"]}}, "unknown method 'FETCH'"),
        (["has space"], "not a valid scope"),
        (42, "list of scopes"),
    ):
        with pytest.raises(ManifestError, match="key 'auth'") as info:
            parse_manifest({"version": "1.0.0", "auth": auth}, "shop")
        assert text in str(info.value)
