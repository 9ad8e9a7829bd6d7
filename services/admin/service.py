"""The admin service: installs the token guard and the kernel's own admin routes."""

from __future__ import annotations

import asyncio
import contextlib
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
        guard = TokenGuard(token_hash)
        kernel.http.set_admin_guard(guard)
        kernel.http.set_admin_authenticator(guard.authenticate)
        flusher = asyncio.get_running_loop().create_task(guard.refusals.run())

        async def stop_flusher() -> None:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
            guard.refusals.flush()

        stack.push_async_callback(stop_flusher)
        kernel.http.add_admin_router(build_router(kernel))
