"""Fixtures of the sandbox tests: a real kernel with the sandbox, real worker processes.

``level`` runs a test at both isolation levels: ``rlimits`` everywhere, ``bwrap`` where
bubblewrap works (CI installs it and sets ``XCORE_TEST_REQUIRE_BWRAP=1``, so there a missing
bubblewrap fails instead of skipping). Folders live in a world-readable temporary folder:
a root kernel's workers run as ``nobody`` and must reach the plugin's files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from kernel import Kernel, Recorded, Settings, create_app
from services.admin.service import AdminService
from services.loader.service import LoaderService
from services.router.service import RouterService
from services.sandbox.isolation import bwrap_works
from services.sandbox.service import SandboxService
from services.scheduler.service import SchedulerService

TOKEN = "sandbox-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def write_plugin(
    plugins: Path,
    name: str,
    *,
    info: dict[str, Any] | None = None,
    run: str = "",
    router: str | None = None,
    config: str | None = None,
) -> Path:
    folder = plugins / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "__init__.py").write_text("")
    info = (
        info
        if info is not None
        else {"version": "1.0.0", "api_prefix": f"/app/{name}", "mode": "sandboxed"}
    )
    (folder / "run.py").write_text(f"PLUGIN_INFO = {info!r}\n" + textwrap.dedent(run))
    if router is not None:
        (folder / "router.py").write_text(textwrap.dedent(router))
    if config is not None:
        (folder / "config.yaml").write_text(textwrap.dedent(config))
    return folder


def sandboxed(name: str, **extra: Any) -> dict[str, Any]:
    return {"version": "1.0.0", "api_prefix": f"/app/{name}", "mode": "sandboxed", **extra}


@pytest.fixture
def base() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="xcore-sandbox-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=["rlimits", "bwrap"])
def level(request: pytest.FixtureRequest) -> str:
    if request.param == "bwrap":
        problem = bwrap_works()
        if problem is not None:
            if os.environ.get("XCORE_TEST_REQUIRE_BWRAP") == "1":
                pytest.fail(f"bubblewrap is required here: {problem}")
            pytest.skip(problem)
    return str(request.param)


@dataclass
class Harness:
    base: Path
    level: str = "rlimits"
    sandbox: dict[str, Any] = field(default_factory=dict)
    loader: dict[str, Any] = field(default_factory=dict)
    kernel: Kernel = field(init=False)
    client: httpx.AsyncClient = field(init=False)
    service: SandboxService = field(init=False)
    _stack: AsyncExitStack | None = None

    @property
    def plugins(self) -> Path:
        return self.base / "plugins"

    def settings(self) -> Settings:
        return Settings(
            data_dir=self.base / "var",
            plugins_dir=self.plugins,
            admin_token=TOKEN,
            reload=False,
            node="test",
            services={
                "loader": {"mount_timeout": 20, "hook_timeout": 5, **self.loader},
                "sandbox": {
                    "level": self.level,
                    "heartbeat_timeout_s": 3,
                    "restart_backoff_s": 0.1,
                    **self.sandbox,
                },
            },
        )

    async def start(self) -> Harness:
        self.plugins.mkdir(parents=True, exist_ok=True)
        self.service = SandboxService()
        self.kernel = Kernel(
            self.settings(),
            services=[
                AdminService(),
                self.service,
                RouterService(),
                SchedulerService(),
                LoaderService(),
            ],
        )
        app = create_app(self.kernel)
        stack = AsyncExitStack()
        await stack.enter_async_context(self.kernel.lifespan(app))
        self.client = await stack.enter_async_context(
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60
            )
        )
        self._stack = stack
        return self

    async def stop(self) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            await stack.aclose()

    async def events(self, *types: str, plugin: str | None = None) -> list[Recorded]:
        out = await self.kernel.read(types=list(types) or None)
        return [
            r
            for r in out
            if plugin is None
            or plugin in (r.data.get("name"), r.data.get("plugin"))
            or str(r.data.get("task", "")).startswith(f"{plugin}.")
        ]

    async def wait_for(
        self, type_name: str, plugin: str, count: int = 1, timeout: float = 30
    ) -> list[Recorded]:
        with anyio.fail_after(timeout):
            while True:
                found = await self.events(type_name, plugin=plugin)
                if len(found) >= count:
                    return found
                await anyio.sleep(0.02)

    async def reload(self, name: str) -> httpx.Response:
        return await self.client.post(f"/admin/plugins/{name}/reload", headers=AUTH)


@pytest.fixture
async def harness(base: Path) -> AsyncIterator[Callable[..., Any]]:
    made: list[Harness] = []

    async def make(level: str = "rlimits", **kwargs: Any) -> Harness:
        h = Harness(base, level, **kwargs)
        made.append(h)
        with anyio.fail_after(60):
            return await h.start()

    yield make
    for h in made:
        with anyio.fail_after(60):
            await h.stop()
