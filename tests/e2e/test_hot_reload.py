"""Hot reload under load, end to end: a real ``xcore serve`` with every service.

Requests keep flowing while a plugin's ``router.py`` is edited three times — a good
edit, a broken one, a fix — and not one of them may fail: the new code answers after
each good edit, the broken edit leaves the previous generation serving, and
``/openapi.json`` follows the routes as they come and go.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import anyio
import httpx

from .server import serve

TOKEN = "e2e-hot-reload-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def router_source(version: int, extra: str) -> str:
    return textwrap.dedent(
        f"""
        from fastapi import APIRouter

        router = APIRouter(prefix="/live", tags=["live"])


        @router.get("/status")
        async def status() -> dict[str, int]:
            return {{"v": {version}}}


        @router.get("/{extra}")
        async def extra() -> str:
            return "{extra}"
        """
    )


async def test_edits_under_load_never_fail_a_request(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    folder = plugins / "live"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text("")
    (folder / "run.py").write_text(
        "PLUGIN_INFO = {'version': '1.0.0', 'Api_prefix': '/app/live', "
        "'tag_for_identified': ['live']}\n"
    )
    (folder / "router.py").write_text(router_source(1, "first"))
    with serve(tmp_path, plugins_dir=plugins, env={"XCORE_ADMIN_TOKEN": TOKEN}) as server:
        results: list[tuple[int, object]] = []
        errors: list[str] = []
        stop = anyio.Event()
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:

            async def load() -> None:
                while not stop.is_set():
                    try:
                        r = await client.get("/app/live/status")
                        results.append((r.status_code, r.json().get("v")))
                    except Exception as exc:  # every failure is counted, none hidden
                        errors.append(repr(exc))

            async def version_served() -> object:
                return (await client.get("/app/live/status")).json()["v"]

            async def paths() -> set[str]:
                return set((await client.get("/openapi.json")).json()["paths"])

            async def wait_version(v: int) -> None:
                with anyio.fail_after(15):
                    while await version_served() != v:
                        await anyio.sleep(0.02)

            with anyio.fail_after(20):
                while True:
                    r = await client.get("/app/live/status")
                    if r.status_code == 200:
                        break
                    await anyio.sleep(0.05)
            assert "/app/live/first" in await paths()

            async with anyio.create_task_group() as tg:
                tg.start_soon(load)
                # 1. a good edit: new code answers, OpenAPI shows the new route
                (folder / "router.py").write_text(router_source(2, "second"))
                await wait_version(2)
                ps = await paths()
                assert "/app/live/second" in ps and "/app/live/first" not in ps
                # 2. a broken edit: recorded as a failed reload; generation 2 keeps serving
                (folder / "router.py").write_text("from fastapi import APIRouter\ndef broken(:\n")
                with anyio.fail_after(15):
                    while True:
                        row = (await client.get("/admin/plugins/live", headers=AUTH)).json()
                        if row["last_error"] is not None:
                            break
                        await anyio.sleep(0.02)
                assert row["last_error"]["stage"] == "import"
                assert "router.py line 2" in row["last_error"]["error"]
                assert row["generation"] == 2 and row["status"] == "loaded"
                assert await version_served() == 2
                # 3. the fix
                (folder / "router.py").write_text(router_source(3, "third"))
                await wait_version(3)
                ps = await paths()
                assert "/app/live/third" in ps and "/app/live/second" not in ps
                await anyio.sleep(0.2)  # a little more load on the newest generation
                stop.set()

        assert errors == []
        assert len(results) > 20
        assert all(status == 200 for status, _ in results), [r for r in results if r[0] != 200]
        served = [v for _, v in results]
        assert served == sorted(served)  # never back to an older generation
        assert {2, 3} <= set(served)
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            row = (await client.get("/admin/plugins/live", headers=AUTH)).json()
        assert row["reloads"] >= 2
