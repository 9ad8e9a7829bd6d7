"""Fixtures of the router tests: a kernel with the router service behind a real uvicorn.

``harness.load(...)`` does what the loader does: publish a ``PluginRuntime`` with
``kernel.plugins.put`` and record ``PluginLoaded`` with ``kernel.request``, awaiting the
router's outcome through the correlation id.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from fastapi import APIRouter, FastAPI, Header, HTTPException

from kernel import Kernel, Recorded, Service, Settings, create_app
from kernel.runtime import PluginRuntime
from services.loader.events import PluginLoaded, PluginUnloaded
from services.loader.events import stream_of as plugin_stream
from services.router.events import RouteConflict, RoutesMounted, RoutesUnmounted
from services.router.service import RouterService

ADMIN_TOKEN = "router-test-token"


def kernel_services() -> list[Service]:
    services: list[Service] = [RouterService()]
    try:
        from services.admin.service import AdminService
    except ImportError:  # the admin service is not in this tree yet: see bearer_guard
        return services
    services.append(AdminService())
    return services


def bearer_guard(authorization: str | None = Header(default=None)) -> None:
    """Stand-in for the admin service's guard (same header), used only while it is absent."""
    if authorization != f"Bearer {ADMIN_TOKEN}":
        raise HTTPException(status_code=401, detail="missing or wrong admin token")


@dataclass
class Harness:
    kernel: Kernel
    router: RouterService
    app: FastAPI
    client: httpx.AsyncClient
    url: str

    async def load(
        self,
        name: str,
        generation: int,
        router: Any,
        prefix: str | None,
        *,
        asgi_app: Any = None,
        routes: list[str] | None = None,
        mode: str = "trusted",
        publish: bool = True,
    ) -> Recorded:
        if publish:
            self.kernel.plugins.put(
                PluginRuntime(
                    name=name,
                    generation=generation,
                    version=f"1.0.{generation}",
                    mode=mode,
                    prefix=prefix,
                    router=router,
                    asgi_app=asgi_app,
                )
            )
        return await self.kernel.request(
            PluginLoaded(
                name=name,
                version=f"1.0.{generation}",
                generation=generation,
                mode="sandboxed" if mode == "sandboxed" else "trusted",
                prefix=prefix,
                routes=routes or [],
                tasks=[],
                digest="test",
                duration_ms=0.0,
            ),
            stream=plugin_stream(name),
            outcomes=[RoutesMounted, RouteConflict],
            timeout=10,
        )

    async def unload(self, name: str, generation: int) -> Recorded:
        return await self.kernel.request(
            PluginUnloaded(name=name, generation=generation),
            stream=plugin_stream(name),
            outcomes=[RoutesUnmounted],
            timeout=10,
        )

    async def admin(self, path: str, token: str | None = ADMIN_TOKEN) -> httpx.Response:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        return await self.client.get(path, headers=headers)


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


async def serve(app: FastAPI) -> AsyncIterator[str]:
    """Run ``app`` (lifespan included) on a real uvicorn server; yield its base URL."""
    sock = free_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        with anyio.fail_after(10):
            while not server.started:
                if task.done():
                    task.result()
                    raise RuntimeError("uvicorn stopped before it started")
                await anyio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        with anyio.fail_after(10):
            await task
        sock.close()


def make_settings(data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir, node="router-test", admin_token=ADMIN_TOKEN, reload=False)


@asynccontextmanager
async def run_harness(
    data_dir: Path, services: list[Service] | None = None
) -> AsyncIterator[Harness]:
    """A started kernel with ``services`` (default: router + admin) behind a real uvicorn."""
    services = kernel_services() if services is None else services
    kernel = Kernel(make_settings(data_dir), services=services)
    if not any(s.name == "admin" for s in services):
        kernel.http.set_admin_guard(bearer_guard)
    app = create_app(kernel)
    async for url in serve(app):
        router = kernel.services["router"]
        assert isinstance(router, RouterService)
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            yield Harness(kernel=kernel, router=router, app=app, client=client, url=url)


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    async with run_harness(tmp_path) as h:
        yield h


@pytest.fixture
def make_harness() -> Any:
    """``async with make_harness(data_dir, services) as harness``: other services beside."""
    return run_harness


def _status_router(prefix: str, label: str) -> APIRouter:
    router = APIRouter(prefix=prefix, tags=[label])

    @router.get("/status")
    async def status() -> dict[str, str]:
        return {"plugin": label}

    return router


@pytest.fixture
def status_router() -> Any:
    """``status_router(prefix, label)``: an APIRouter with ``GET <prefix>/status -> {plugin: label}``."""
    return _status_router
