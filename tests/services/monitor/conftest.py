"""A kernel with the monitor, admin and router services behind a real uvicorn."""

from __future__ import annotations

import asyncio
import logging
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
from fastapi import FastAPI

from kernel import Kernel, Service, Settings, create_app
from kernel.runtime import PluginRuntime
from services.admin.service import AdminService
from services.loader.events import PluginLoaded
from services.loader.events import stream_of as plugin_stream
from services.monitor.service import MonitorService
from services.router.events import RouteConflict, RoutesMounted
from services.router.service import RouterService

TOKEN = "monitor-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class Monitored:
    kernel: Kernel
    monitor: MonitorService
    app: FastAPI
    client: httpx.AsyncClient
    url: str

    async def load(self, name: str, router: Any, prefix: str, auth: Any = None) -> None:
        from kernel.access import parse_auth

        self.kernel.plugins.put(
            PluginRuntime(
                name=name,
                generation=1,
                version="1.0.0",
                mode="trusted",
                prefix=prefix,
                router=router,
                auth=parse_auth(auth),
            )
        )
        answer = await self.kernel.request(
            PluginLoaded(
                name=name,
                version="1.0.0",
                generation=1,
                mode="trusted",
                prefix=prefix,
                routes=[],
                tasks=[],
                digest="test",
                duration_ms=0.0,
            ),
            stream=plugin_stream(name),
            outcomes=[RoutesMounted, RouteConflict],
            timeout=10,
        )
        assert answer.type == "RoutesMounted", answer.data


async def serve(app: FastAPI, port: int = 0) -> AsyncIterator[str]:
    """Run ``app`` on a real uvicorn (open streams are cut 1 s after the stop)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, lifespan="on", log_level="warning", access_log=False, timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        with anyio.fail_after(20):
            while not server.started:
                if task.done():
                    task.result()
                    raise RuntimeError("uvicorn stopped before it started")
                await anyio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        with anyio.fail_after(30):
            await task
        sock.close()


def settings(data_dir: Path, **services: Any) -> Settings:
    return Settings(
        data_dir=data_dir,
        node="monitor-test",
        admin_token=TOKEN,
        reload=False,
        services=services,
    )


@asynccontextmanager
async def monitored(
    data_dir: Path, *, extra: list[Service] | None = None, port: int = 0, **sections: Any
) -> AsyncIterator[Monitored]:
    services: list[Service] = [MonitorService(), AdminService(), RouterService(), *(extra or [])]
    kernel = Kernel(settings(data_dir, **sections), services=services)
    app = create_app(kernel)
    async for url in serve(app, port):
        monitor = kernel.services["monitor"]
        assert isinstance(monitor, MonitorService)
        async with httpx.AsyncClient(base_url=url, timeout=20) as client:
            yield Monitored(kernel, monitor, app, client, url)


@pytest.fixture
def capture_info() -> Any:
    """Let INFO lines through the loggers used by the tests (pytest leaves WARNING)."""
    root = logging.getLogger()
    old = root.level
    root.setLevel(logging.INFO)
    yield
    root.setLevel(old)
