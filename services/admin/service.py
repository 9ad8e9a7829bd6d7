"""The admin service: installs the token guard and the kernel's own admin routes."""

from __future__ import annotations

from contextlib import AsyncExitStack

from kernel.kernel import Kernel
from services.admin.api import build_router
from services.admin.auth import TokenGuard, load_or_create_token_hash

__all__ = ["AdminService"]


class AdminService:
    """Guards every ``/admin`` route with the admin bearer token."""

    name = "admin"
    #: before every service that adds admin routes
    order = 10

    async def start(self, kernel: Kernel, stack: AsyncExitStack) -> None:
        token = kernel.settings.admin_token
        token_hash = load_or_create_token_hash(
            kernel.settings.data_dir, token.get_secret_value() if token is not None else None
        )
        kernel.http.set_admin_guard(TokenGuard(token_hash))
        kernel.http.add_admin_router(build_router(kernel))
