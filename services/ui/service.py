"""The admin page service: mounts ``/admin/ui`` and the two admin routes the page needs."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.routing import Mount

from kernel.kernel import Kernel
from services.ui.app import MOUNT, UiApp
from services.ui.related import build_router as related_router
from services.ui.sessions import LoginThrottle, SessionStore

__all__ = ["UiService", "UiSettings"]

#: What a token can do when the admin guard does not say (the single admin token).
ALL_SCOPES = ["admin:read", "admin:write"]


class UiSettings(BaseModel):
    """``services.ui`` in settings."""

    model_config = ConfigDict(extra="forbid")

    #: How long a login lasts, in seconds (absolute, not renewed by activity).
    session_ttl: float = Field(default=8 * 3600, gt=0, le=30 * 24 * 3600)
    #: Live tables keep at most this many rows in the page (older ones are dropped).
    max_rows: int = Field(default=500, ge=10, le=10_000)
    #: How often the plugin and task views refresh, in milliseconds.
    refresh_ms: int = Field(default=2000, ge=250, le=60_000)
    #: Failed logins allowed per client address and minute.
    login_attempts_per_minute: int = Field(default=10, ge=1, le=1000)


class UiService:
    """Serves the admin web page at ``/admin/ui``."""

    name = "ui"
    #: after the admin service, which installs the guard the page's calls go through
    order = 90

    async def start(self, kernel: Kernel, stack: AsyncExitStack) -> None:
        settings = kernel.settings.section("ui", UiSettings)
        app = UiApp(
            SessionStore(ttl=settings.session_ttl),
            LoginThrottle(limit=settings.login_attempts_per_minute),
            max_rows=settings.max_rows,
            refresh_ms=settings.refresh_ms,
        )
        kernel.http.add_front_route(Mount(MOUNT, app=app))
        # the page checks its own session cookie; its calls to the admin API carry the
        # session's token and go through the admin guard like any other
        kernel.http.add_self_authenticating_prefix(MOUNT)
        # a call through the bridge may carry what the admin route accepts (an archive)
        kernel.http.alias_body_limits(MOUNT + "/api", "/admin")
        kernel.http.add_admin_router(related_router(kernel))
        kernel.http.add_admin_router(_whoami_router())


def _whoami_router() -> APIRouter:
    router = APIRouter(tags=["admin"])

    @router.get("/whoami", summary="The scopes of the token this request bears")
    async def whoami(request: Request) -> dict[str, Any]:
        scopes = getattr(request.state, "admin_scopes", None)
        return {
            "principal": getattr(request.state, "admin_principal", "admin"),
            "scopes": list(scopes) if scopes is not None else ALL_SCOPES,
        }

    return router
