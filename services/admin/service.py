"""The admin service: installs the token guard, the token store and the kernel's admin routes."""

from __future__ import annotations

import asyncio
import contextlib
from contextlib import AsyncExitStack

from kernel.kernel import Kernel
from services.admin.api import build_router
from services.admin.auth import TokenGuard, load_or_create_token_hash
from services.admin.token_api import build_token_router
from services.admin.tokens import AdminTokens

__all__ = ["AdminService"]


class AdminService:
    """Guards every ``/admin`` route with a bearer token holding the needed scope."""

    name = "admin"
    #: before every service that adds admin routes
    order = 10

    async def start(self, kernel: Kernel, stack: AsyncExitStack) -> None:
        token = kernel.settings.admin_token
        token_hash = load_or_create_token_hash(
            kernel.settings.data_dir, token.get_secret_value() if token is not None else None
        )
        book = await kernel.add_projection(AdminTokens())
        guard = TokenGuard(token_hash, book.verify)
        kernel.http.set_admin_guard(guard)
        kernel.http.set_admin_authenticator(guard.authenticate)
        kernel.http.set_token_verifier(guard.scopes)
        flusher = asyncio.get_running_loop().create_task(guard.refusals.run())

        async def stop_flusher() -> None:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
            guard.refusals.flush()

        stack.push_async_callback(stop_flusher)
        kernel.http.add_admin_router(build_router(kernel))
        kernel.http.add_admin_router(build_token_router(kernel))
