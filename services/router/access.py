"""Who may call a plugin route: bearer API tokens or OAuth2 JWTs, checked by the dispatcher.

Guarantee: a route whose plugin's manifest requires scopes (``kernel.access``) is
answered only for a request bearing a valid token that holds every one of them; any
other request gets 401 (no token, unknown/expired/wrongly signed token, wrong issuer or
audience) or 403 (valid, but a scope is missing), with an RFC 6750
``WWW-Authenticate`` header, before the plugin's code runs. It holds for every plugin,
trusted or sandboxed, because the dispatcher checks before handing the request on.

Mechanism: the presented token is first offered to the kernel's token verifier (the
admin service's API tokens, hashed; the admin token holds every scope); failing that,
when ``services.router.auth.jwt`` is configured, it is verified as a JWT with PyJWT:
the signature (HS256 with a secret; RS256/ES256 with a PEM public key or a JWKS file),
``exp`` (required), ``nbf``, ``iss`` and ``aud`` when configured, with ``leeway``
seconds of clock skew. Scopes come from ``scope`` (space separated), ``scp`` or
``scopes``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jwt
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from kernel.errors import SettingsError
from kernel.logging import redact

__all__ = ["AuthError", "Authenticator", "JwtSettings", "Principal", "RouterSettings"]

log = logging.getLogger("xcore.router.auth")

TokenVerifier = Callable[[str], "frozenset[str] | None"]
Algorithm = Literal["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "PS256"]


class JwtSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    algorithms: tuple[Algorithm, ...] = ("HS256",)
    #: HS* key.
    secret: SecretStr | None = None
    #: RS*/ES*/PS* public key (PEM file).
    public_key_file: Path | None = None
    #: RS*/ES*/PS* keys as a JWKS document (file); the token's ``kid`` picks the key.
    jwks_file: Path | None = None
    issuer: str | None = None
    audience: str | None = None
    #: Seconds of clock skew allowed on exp/nbf/iat.
    leeway: float = Field(default=30.0, ge=0, le=3600)

    @field_validator("secret")
    @classmethod
    def _never_logged(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            if len(value.get_secret_value()) < 32:
                raise ValueError("an HS256 secret needs at least 32 characters")
            redact(value.get_secret_value())
        return value

    @model_validator(mode="after")
    def _keys(self) -> JwtSettings:
        hs = any(a.startswith("HS") for a in self.algorithms)
        other = any(not a.startswith("HS") for a in self.algorithms)
        if hs and self.secret is None:
            raise ValueError("HS algorithms need 'secret'")
        if other and self.public_key_file is None and self.jwks_file is None:
            raise ValueError("RS/ES/PS algorithms need 'public_key_file' or 'jwks_file'")
        if hs and other:
            raise ValueError("mix HS and public-key algorithms in two kernels, not one")
        return self


class AuthSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    jwt: JwtSettings | None = None


class RouterSettings(BaseModel):
    """The ``services.router`` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Request ids and per-route metrics on plugin requests (off only to measure them).
    observe: bool = True
    auth: AuthSettings = AuthSettings()


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str
    scopes: frozenset[str]
    kind: Literal["token", "jwt"]


class AuthError(Exception):
    def __init__(self, status: int, error: str, description: str, scope: str = "") -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description
        self.scope = scope

    def challenge(self) -> str:
        parts = [f'error="{self.error}"', f'error_description="{self.description}"']
        if self.scope:
            parts.append(f'scope="{self.scope}"')
        return "Bearer " + ", ".join(parts) if self.error else "Bearer"


class Authenticator:
    """Turns a bearer token into a :class:`Principal`, or raises :class:`AuthError`."""

    def __init__(self, settings: JwtSettings | None, verifier: Callable[[], TokenVerifier | None]):
        self.settings = settings
        self._verifier = verifier
        self._key: Any = None
        self._jwks: jwt.PyJWKSet | None = None
        if settings is not None:
            self._load_keys(settings)

    def _load_keys(self, s: JwtSettings) -> None:
        if s.secret is not None:
            self._key = s.secret.get_secret_value()
        if s.public_key_file is not None:
            try:
                self._key = s.public_key_file.read_text()
            except OSError as exc:
                raise SettingsError(
                    f"setting 'services.router.auth.jwt.public_key_file': {s.public_key_file} cannot be read: {exc}"
                ) from None
        if s.jwks_file is not None:
            try:
                self._jwks = jwt.PyJWKSet.from_dict(json.loads(s.jwks_file.read_text()))
            except (OSError, ValueError, jwt.PyJWTError) as exc:
                raise SettingsError(
                    f"setting 'services.router.auth.jwt.jwks_file': {s.jwks_file} is not a usable JWKS: {exc}"
                ) from None

    @property
    def schemes(self) -> list[str]:
        return ["bearerToken", *(["oauth2Jwt"] if self.settings is not None else [])]

    def authenticate(self, header: str | None) -> Principal:
        if not header:
            raise AuthError(401, "", "this route needs 'Authorization: Bearer <token>'")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError(401, "invalid_request", "use 'Authorization: Bearer <token>'")
        verifier = self._verifier()
        if verifier is not None:
            scopes = verifier(token)
            if scopes is not None:
                return Principal("token", scopes, "token")
        if self.settings is not None and token.count(".") == 2:
            return self._jwt(token)
        raise AuthError(401, "invalid_token", "the token is unknown, revoked or expired")

    def _jwt(self, token: str) -> Principal:
        s = self.settings
        assert s is not None
        key = self._key
        try:
            if self._jwks is not None:
                kid = jwt.get_unverified_header(token).get("kid")
                matches = [k for k in self._jwks.keys if kid is None or k.key_id == kid]
                if not matches:
                    raise AuthError(
                        401, "invalid_token", "no key of the JWKS matches the token's kid"
                    )
                key = matches[0].key
            claims = jwt.decode(
                token,
                key,
                algorithms=list(s.algorithms),
                audience=s.audience,
                issuer=s.issuer,
                leeway=s.leeway,
                options={"require": ["exp"], "verify_aud": s.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(401, "invalid_token", "the token has expired") from None
        except jwt.InvalidAudienceError:
            raise AuthError(401, "invalid_token", "the token is not for this audience") from None
        except jwt.InvalidIssuerError:
            raise AuthError(401, "invalid_token", "the token's issuer is not trusted") from None
        except jwt.InvalidSignatureError:
            raise AuthError(401, "invalid_token", "the token's signature is wrong") from None
        except jwt.PyJWTError as exc:
            raise AuthError(401, "invalid_token", f"the token is invalid: {_plain(exc)}") from None
        return Principal(str(claims.get("sub", "?")), _claim_scopes(claims), "jwt")


def _plain(exc: Exception) -> str:
    return str(exc).replace('"', "'")[:200]


def _claim_scopes(claims: dict[str, Any]) -> frozenset[str]:
    """The scopes a JWT grants. ``*`` (every scope) belongs to xcore's own admin token:
    an identity provider's literal ``*`` scope grants nothing here."""
    out: set[str] = set()
    for name in ("scope", "scp", "scopes"):
        value = claims.get(name)
        if isinstance(value, str):
            out.update(value.split())
        elif isinstance(value, list):
            out.update(v for v in value if isinstance(v, str))
    out.discard("*")
    return frozenset(out)


def check_scopes(principal: Principal, needed: tuple[str, ...]) -> None:
    """Raise 403 unless ``principal`` holds every scope in ``needed`` ('*' holds all)."""
    if "*" in principal.scopes:
        return
    missing = [s for s in needed if s not in principal.scopes]
    if missing:
        raise AuthError(
            403,
            "insufficient_scope",
            f"the token lacks the scope(s) {', '.join(missing)}",
            scope=" ".join(needed),
        )


def security_schemes(auth: Authenticator) -> dict[str, Any]:
    """OpenAPI ``components.securitySchemes`` for plugin routes (Swagger's Authorize)."""
    schemes: dict[str, Any] = {
        "bearerToken": {
            "type": "http",
            "scheme": "bearer",
            "description": "An xcore API token (`xcore token create --scope ...`).",
        }
    }
    if auth.settings is not None:
        schemes["oauth2Jwt"] = {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": "An OAuth2 access token (JWT) from the configured issuer.",
        }
    return schemes
