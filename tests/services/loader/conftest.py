"""Fixtures of the loader tests: plugin folders written on disk, and a real kernel.

``Harness`` runs a kernel (SQLite log in ``tmp_path``) with the admin, router and loader
services, its FastAPI app (lifespan entered) and an httpx client on that app.
"""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from kernel import Kernel, Recorded, Settings, create_app
from services.admin.service import AdminService
from services.loader.core import Loader
from services.loader.projection import PluginTable
from services.loader.service import LoaderService
from services.router.service import RouterService

TOKEN = "loader-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def write_plugin(
    plugins: Path,
    name: str,
    *,
    info: dict[str, Any] | str | None = None,
    run: str = "",
    router: str | None = None,
    config: str | None = None,
    files: dict[str, str] | None = None,
) -> Path:
    """Write a plugin folder; ``router`` is the body of router.py after the APIRouter line."""
    folder = plugins / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "__init__.py").write_text("")
    if info is None:
        info = {"version": "1.0.0", "api_prefix": f"/app/{name}"}
    info_src = info if isinstance(info, str) else repr(info)
    (folder / "run.py").write_text(f"PLUGIN_INFO = {info_src}\n" + textwrap.dedent(run))
    if router is not None:
        (folder / "router.py").write_text(textwrap.dedent(router))
    if config is not None:
        (folder / "config.yaml").write_text(textwrap.dedent(config))
    for rel, text in (files or {}).items():
        (folder / rel).write_text(textwrap.dedent(text))
    return folder


def status_router(body: str = '{"v": 1}', path: str = "/status") -> str:
    return f"""
        from fastapi import APIRouter
        router = APIRouter()

        @router.get("{path}")
        async def status():
            return {body}
        """


@dataclass
class Harness:
    tmp: Path
    plugins: Path
    reload: bool = False
    services_extra: list[Any] = field(default_factory=list)
    #: Overrides of the ``services.loader`` section, and of the kernel's settings.
    loader_overrides: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    kernel: Kernel = field(init=False)
    client: httpx.AsyncClient = field(init=False)
    loader_service: LoaderService = field(init=False)
    _stack: AsyncExitStack | None = None

    def settings(self) -> Settings:
        return Settings(
            data_dir=self.tmp / "var",
            plugins_dir=self.plugins,
            admin_token=TOKEN,
            reload=self.reload,
            node="test",
            services={"loader": {"mount_timeout": 10, "hook_timeout": 5, **self.loader_overrides}},
            **self.extra,
        )

    async def start(self) -> Harness:
        self.loader_service = LoaderService()
        self.kernel = Kernel(
            self.settings(),
            services=[AdminService(), RouterService(), *self.services_extra, self.loader_service],
        )
        app = create_app(self.kernel)
        stack = AsyncExitStack()
        await stack.enter_async_context(self.kernel.lifespan(app))
        self.client = await stack.enter_async_context(
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
        )
        self._stack = stack
        return self

    async def stop(self) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            await stack.aclose()

    async def restart(self) -> Harness:
        await self.stop()
        return await self.start()

    @property
    def loader(self) -> Loader:
        assert self.loader_service.loader is not None
        return self.loader_service.loader

    @property
    def table(self) -> PluginTable:
        return self.kernel.projection(PluginTable)

    async def events(self, *types: str, name: str | None = None) -> list[Recorded]:
        out = await self.kernel.read(types=list(types) or None)
        return [r for r in out if name is None or r.data.get("name") == name]

    async def wait_for(self, type_name: str, name: str, count: int = 1) -> list[Recorded]:
        with anyio.fail_after(10):
            while True:
                found = await self.events(type_name, name=name)
                if len(found) >= count:
                    return found
                await anyio.sleep(0.01)


@pytest.fixture
def plugins(tmp_path: Path) -> Path:
    folder = tmp_path / "plugins"
    folder.mkdir()
    return folder


@pytest.fixture
async def harness_factory(tmp_path: Path, plugins: Path) -> AsyncIterator[Callable[..., Any]]:
    made: list[Harness] = []

    async def make(
        reload: bool = False, loader: dict[str, Any] | None = None, **extra: Any
    ) -> Harness:
        h = Harness(tmp_path, plugins, reload=reload, loader_overrides=loader or {}, extra=extra)
        made.append(h)
        with anyio.fail_after(30):
            return await h.start()

    yield make
    for h in made:
        with anyio.fail_after(30):
            await h.stop()
