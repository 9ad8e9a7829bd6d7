"""``/admin/tokens``: issue, list and revoke scoped API tokens (recorded as events)."""

from __future__ import annotations

import math
import time
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from kernel.access import parse_auth
from kernel.contract import error_responses, link
from kernel.kernel import Kernel
from services.admin.events import STREAM, TokenCreated, TokenRevoked
from services.admin.tokens import ALL, AdminTokens, new_token

__all__ = ["build_token_router"]


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9 _.:@-]+$")
    scopes: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:*/-]{1,100}$")]] = Field(
        min_length=1, max_length=50
    )
    #: Seconds from now until the token expires (None: never).
    expires_in: float | None = Field(default=None, gt=0, le=10 * 365 * 86400, allow_inf_nan=False)

    @field_validator("expires_in", mode="before")
    @classmethod
    def _finite_input(cls, value: Any) -> Any:
        # NaN/Infinity (accepted by Python's JSON parser) would be echoed as the 422's
        # "input", which JSON cannot encode: the answer became a 500. Echo it as text.
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        return value


def build_token_router(kernel: Kernel) -> APIRouter:
    router = APIRouter(tags=["admin"])

    def book() -> AdminTokens:
        return kernel.projection(AdminTokens)

    async def settle(position: int) -> None:
        try:
            await kernel.settle(position)
        except TimeoutError:
            raise HTTPException(
                status_code=504,
                detail=f"recorded at position {position}, but the token table has not caught up yet",
            ) from None

    revoke = "/admin/tokens/{token_id}"

    @router.get(
        "/tokens",
        summary="Every API token issued (never the token itself)",
        responses={
            200: {
                "links": {
                    "RevokeFirstToken": link(revoke, "delete", token_id="$response.body#/0/id")
                }
            }
        },
    )
    async def list_tokens() -> list[dict[str, Any]]:
        now = time.time()
        return [t.public(now) for t in sorted(book().tokens.values(), key=lambda t: t.created_at)]

    @router.post(
        "/tokens",
        status_code=201,
        summary="Issue an API token with scopes; the token is shown only in this answer",
        responses={
            **error_responses(403, 422, 504),
            201: {
                "description": "The token, shown only in this answer",
                "links": {"RevokeToken": link(revoke, "delete", token_id="$response.body#/id")},
            },
        },
    )
    async def create_token(body: TokenRequest, request: Request) -> dict[str, Any]:
        try:
            scopes = sorted(set(parse_auth(body.scopes).scopes))
        except ValueError as exc:
            raise HTTPException(
                status_code=422,
                detail=[{"loc": ["body", "scopes"], "msg": str(exc), "type": "value_error"}],
            ) from None
        held: frozenset[str] = getattr(request.state, "admin_scopes", frozenset())
        beyond = [s for s in scopes if ALL not in held and s not in held]
        if beyond:
            raise HTTPException(
                status_code=403,
                detail=f"a token can only grant scopes it holds; this one lacks {', '.join(beyond)}",
            )
        token_id, token, digest = new_token()
        expires_at = None if body.expires_in is None else time.time() + body.expires_in
        actor = getattr(request.state, "admin_principal", "admin")
        [record] = await kernel.append(
            TokenCreated(
                token_id=token_id,
                name=body.name,
                scopes=scopes,
                expires_at=expires_at,
                digest=digest,
                created_by=actor,
            ),
            stream=STREAM,
            actor=actor,
        )
        await settle(record.position)
        return {**book().tokens[token_id].public(time.time()), "token": token}

    @router.delete(
        "/tokens/{token_id}",
        summary="Revoke an API token (recorded as TokenRevoked)",
        responses=error_responses(404, 422, 504),
    )
    async def revoke_token(
        request: Request, token_id: str = Path(pattern=r"^[0-9a-f]{16}$")
    ) -> dict[str, Any]:
        record = book().tokens.get(token_id)
        if record is None:
            raise HTTPException(status_code=404, detail=f"no token with id {token_id!r}")
        if record.revoked_at is None:
            actor = getattr(request.state, "admin_principal", "admin")
            [event] = await kernel.append(
                TokenRevoked(token_id=token_id, revoked_by=actor), stream=STREAM, actor=actor
            )
            await settle(event.position)
        return record.public(time.time())

    return router
