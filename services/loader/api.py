"""The loader's admin API (served under ``/admin`` behind the admin guard).

    GET    /admin/plugins                 every plugin's state (the projection)
    GET    /admin/plugins/{name}          one plugin
    POST   /admin/plugins/reload          reload all (one request per plugin)
    POST   /admin/plugins/{name}/reload   reload one
    POST   /admin/plugins/{name}/enable   enable (and load)
    POST   /admin/plugins/{name}/disable  disable (and unload)
    POST   /admin/plugins                 install an uploaded archive (multipart ``file``)
    DELETE /admin/plugins/{name}          uninstall

Commands are requests (DESIGN "Requests are events too"): the route records the request
event with ``kernel.request`` and answers with the outcome event's content — 200 when it
succeeded, 422 when the outcome is a failure — or 404 / 409 / 413 / 422 before recording
anything when the request cannot make sense, and 504 when no outcome came in time.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import JSONResponse

from kernel.errors import RequestTimeout
from kernel.events import Event, Recorded
from kernel.http import error_responses, link
from services.cluster.projection import served_digests

from .events import (
    PLUGINS_STREAM,
    PluginDisabled,
    PluginEnabled,
    PluginInstallFailed,
    PluginInstallRequested,
    PluginReloaded,
    PluginReloadFailed,
    PluginReloadRequested,
    PluginUninstalled,
    PluginUninstallFailed,
    PluginUninstallRequested,
    PluginUnloaded,
    stream_of,
)
from .installer import ARCHIVE_SUFFIXES
from .manifest import valid_name

if TYPE_CHECKING:
    from kernel.kernel import Kernel

    from .core import Loader

__all__ = ["build_router"]

ACTOR = "admin"
FAILURES = {
    PluginReloadFailed.type_name,
    PluginInstallFailed.type_name,
    PluginUninstallFailed.type_name,
}
RELOAD_OUTCOMES: list[type[Event]] = [PluginReloaded, PluginReloadFailed, PluginUninstalled]


def outcome(record: Recorded) -> JSONResponse:
    body = {"outcome": record.type, **record.data}
    if record.type in FAILURES:
        body["detail"] = record.data.get("error", "failed")
        return JSONResponse(body, status_code=422)
    return JSONResponse(body)


def build_router(kernel: Kernel, loader: Loader) -> APIRouter:
    router = APIRouter(tags=["plugins"])

    def known(name: str) -> bool:
        return valid_name(name) and (
            loader.folder(name).is_dir() or name in loader.loaded or name in loader.table.rows
        )

    def require(name: str) -> None:
        if not known(name):
            raise HTTPException(404, f"no plugin named {name!r}")

    def row(name: str) -> dict[str, Any]:
        state = loader.table.get(name)
        if state is None:
            state = {"name": name, "status": "unloaded", "enabled": True}
        state["installed"] = loader.folder(name).is_dir()
        state["stuck_threads"] = loader.threads.stuck_of(name)
        state["reloads_paused"] = name in loader.paused
        hosted = kernel.hosts.describe(name, state.get("mode"))
        if hosted is not None:  # e.g. a sandboxed plugin's level, limits and stats
            state["host"] = hosted
        nodes = served_digests(kernel, name)
        if nodes is not None:  # a cluster: what each live node serves (docs/cluster.md)
            state["nodes"] = nodes
            state["digest_differs"] = len(set(nodes.values())) > 1
        return state

    async def request(event: Event, stream: str, outcomes: list[type[Event]]) -> Recorded:
        try:
            return await kernel.request(event, stream=stream, outcomes=outcomes, actor=ACTOR)
        except RequestTimeout as exc:
            raise HTTPException(504, str(exc)) from None

    first = "$response.body#/0/name"
    plugin_links = {
        "links": {
            "GetFirstPlugin": link("/admin/plugins/{name}", "get", name=first),
            "ReloadFirstPlugin": link("/admin/plugins/{name}/reload", "post", name=first),
            "DisableFirstPlugin": link("/admin/plugins/{name}/disable", "post", name=first),
            "EnableFirstPlugin": link("/admin/plugins/{name}/enable", "post", name=first),
            "UninstallFirstPlugin": link("/admin/plugins/{name}", "delete", name=first),
        }
    }

    @router.get("/plugins", summary="Every plugin and its state", responses={200: plugin_links})
    async def list_plugins() -> list[dict[str, Any]]:
        names = set(loader.table.rows) | set(loader.installed())
        return [row(n) for n in sorted(names)]

    @router.get("/plugins/{name}", summary="One plugin's state", responses=error_responses(404))
    async def get_plugin(name: str) -> dict[str, Any]:
        require(name)
        return row(name)

    @router.post(
        "/plugins/reload", summary="Reload every enabled plugin", responses=error_responses(504)
    )
    async def reload_all() -> dict[str, Any]:
        results = []
        for name in loader.reload_targets():
            rec = await request(
                PluginReloadRequested(name=name, reason="admin: reload all"),
                stream_of(name),
                RELOAD_OUTCOMES,
            )
            results.append({"outcome": rec.type, **rec.data})
        failed = sum(r["outcome"] in FAILURES for r in results)
        return {"reloaded": len(results) - failed, "failed": failed, "results": results}

    @router.post(
        "/plugins/{name}/reload",
        summary="Reload one plugin (a new generation)",
        responses=error_responses(404, 409, 422, 504),
    )
    async def reload_one(name: str) -> JSONResponse:
        require(name)
        if name in loader.table.disabled():
            raise HTTPException(409, f"plugin {name!r} is disabled; enable it first")
        rec = await request(
            PluginReloadRequested(name=name, reason="admin"), stream_of(name), RELOAD_OUTCOMES
        )
        return outcome(rec)

    @router.post(
        "/plugins/{name}/enable",
        summary="Enable a plugin and load it",
        responses=error_responses(404, 409, 422, 504),
    )
    async def enable(name: str) -> JSONResponse:
        require(name)
        if name not in loader.table.disabled():
            raise HTTPException(
                409, f"plugin {name!r} is already enabled (reload it to retry a failed load)"
            )
        if not loader.folder(name).is_dir():
            raise HTTPException(404, f"plugin {name!r} is not installed")
        rec = await request(
            PluginEnabled(name=name), stream_of(name), [PluginReloaded, PluginReloadFailed]
        )
        return outcome(rec)

    @router.post(
        "/plugins/{name}/disable",
        summary="Disable a plugin (unloading it)",
        responses=error_responses(404, 409, 422, 504),
    )
    async def disable(name: str) -> JSONResponse:
        require(name)
        if name in loader.table.disabled():
            raise HTTPException(409, f"plugin {name!r} is already disabled")
        dependents = loader.dependents(name)
        if dependents:
            raise HTTPException(
                409, f"plugin {name!r} is required by loaded plugin(s) {', '.join(dependents)}"
            )
        if name in loader.loaded:
            rec = await request(PluginDisabled(name=name), stream_of(name), [PluginUnloaded])
        else:
            rec = (
                await kernel.append(PluginDisabled(name=name), stream=stream_of(name), actor=ACTOR)
            )[0]
            await kernel.settle(rec.position)
        return outcome(rec)

    @router.delete(
        "/plugins/{name}",
        summary="Uninstall a plugin (unloading it)",
        responses=error_responses(404, 409, 422, 504),
    )
    async def uninstall(name: str) -> JSONResponse:
        require(name)
        dependents = loader.dependents(name)
        if dependents:
            raise HTTPException(
                409, f"plugin {name!r} is required by loaded plugin(s) {', '.join(dependents)}"
            )
        rec = await request(
            PluginUninstallRequested(name=name),
            stream_of(name),
            [PluginUninstalled, PluginUninstallFailed],
        )
        return outcome(rec)

    @router.post(
        "/plugins",
        summary="Install a plugin from an uploaded .zip / .tar.gz",
        responses=error_responses(400, 413, 422, 504),
    )
    async def install(
        request_: Request,
        file: UploadFile = File(..., description="the plugin archive"),
        replace: bool = Form(False, description="replace an installed plugin of that name"),
    ) -> JSONResponse:
        limit = loader.limits.max_bytes
        declared = request_.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit + 64 * 1024:
            raise HTTPException(413, f"the upload exceeds the limit of {limit} bytes")
        filename = Path(file.filename or "").name
        if not filename.lower().endswith(ARCHIVE_SUFFIXES):
            raise HTTPException(
                422, f"{filename!r} is not an archive ({', '.join(ARCHIVE_SUFFIXES)})"
            )
        filename = re.sub(r"[^A-Za-z0-9._-]", "_", filename)
        folder = loader.data_dir / "uploads" / uuid.uuid4().hex
        path = folder / filename
        try:
            size = await _save(file, folder, path, limit)
            if size > limit:
                raise HTTPException(413, f"the upload exceeds the limit of {limit} bytes")
            rec = await request(
                PluginInstallRequested(source=str(path), replace=replace),
                PLUGINS_STREAM,
                [PluginInstallFailed, PluginReloaded, PluginReloadFailed],
            )
        finally:
            await asyncio.to_thread(shutil.rmtree, folder, True)
        return outcome(rec)

    return router


async def _save(file: UploadFile, folder: Path, path: Path, limit: int) -> int:
    await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    size = 0
    with open(path, "wb") as out:  # noqa: ASYNC230 - small chunks, see below
        while chunk := await file.read(256 * 1024):
            size += len(chunk)
            if size > limit:
                break
            await asyncio.to_thread(out.write, chunk)
    return size
