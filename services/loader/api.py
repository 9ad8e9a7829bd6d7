"""The loader's admin API (served under ``/admin`` behind the admin guard).

    GET    /admin/plugins                 every plugin's state (the projection)
    GET    /admin/plugins/{name}          one plugin
    POST   /admin/plugins/reload          reload all (one request per plugin)
    POST   /admin/plugins/{name}/reload   reload one
    POST   /admin/plugins/{name}/enable   enable (and load)
    POST   /admin/plugins/{name}/disable  disable (and unload)
    POST   /admin/plugins                 install an uploaded archive (multipart ``file``)
    DELETE /admin/plugins/{name}          uninstall
    GET    /admin/loader/requests        the loader's queue: the request in hand, those in line
                                         (paged: ?limit=N&cursor=C, next_cursor)
    GET    /admin/loader/requests/{id}   one request: queued / running / succeeded / failed

Commands are requests (DESIGN "Requests are events too"): the route records the request
event and answers with the outcome event's content — 200 when it succeeded, 422 when the
outcome is a failure — or 404 / 409 / 413 / 422 before recording anything when the
request cannot make sense. The loader answers requests one at a time, in order: a
request still queued or running after ``services.loader.admin_wait`` is answered 202
with its id (its log position), its place in the queue and the URL that follows it
(``services/loader/queue.py``); it runs all the same. A reload of a plugin whose reload
is already queued joins that request (same id, ``merged: true``). The line is bounded
(``services.loader.max_queued``): a request that would pass it is refused at once, 429
with ``Retry-After``, naming the plugin and the bound; nothing is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, File, Form, HTTPException, Query, Request, UploadFile
from fastapi import Path as FastPath
from fastapi.responses import JSONResponse

from kernel.contract import ErrorBody, error_responses, link
from kernel.events import Event, Recorded
from services.cluster.projection import served_digests

from .events import (
    PLUGINS_STREAM,
    PluginDisabled,
    PluginEnabled,
    PluginInstallFailed,
    PluginInstallRequested,
    PluginReloadFailed,
    PluginReloadRequested,
    PluginUninstallFailed,
    PluginUninstallRequested,
    stream_of,
)
from .installer import ARCHIVE_SUFFIXES
from .manifest import valid_name
from .queue import LineBehind, QueueFull, describe, request_url

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
#: A request accepted for later, as a 202 body and as an item of ``reload all``'s results.
ACCEPTED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["id", "url", "status", "queue_position"],
    "properties": {
        "id": {"type": "integer", "description": "the request's log position"},
        "event_id": {"type": "string"},
        "request": {"type": "string", "description": "the request event"},
        "url": {"type": "string", "description": "GET it to follow the request"},
        "status": {"type": "string", "enum": ["queued", "running"]},
        "queue_position": {
            "type": "integer",
            "description": "0: in hand (running); n >= 1: n-th in line",
        },
        "merged": {"type": "boolean", "description": "it joined a reload already queued"},
        "name": {"type": "string"},
    },
}
FOLLOW = {
    "FollowRequest": link(
        "/admin/loader/requests/{request_id}", "get", request_id="$response.body#/id"
    )
}
#: What a 202 answer looks like (the OpenAPI schema of the accepted requests).
ACCEPTED: dict[int | str, dict[str, Any]] = {
    202: {
        "description": (
            "Accepted: the request is queued or running behind the loader's other requests "
            "and was not answered within services.loader.admin_wait (or ?wait); follow "
            "`url` (GET) to its outcome."
        ),
        "headers": {"Location": {"description": "the URL that follows the request"}},
        "content": {"application/json": {"schema": ACCEPTED_SCHEMA}},
        "links": FOLLOW,
    }
}
ACCEPTED_ALL: dict[int | str, dict[str, Any]] = {
    202: {
        "description": (
            "Some reloads are still queued or running (`pending`); each item of `results` "
            "is either its outcome or its acceptance, with the `url` that follows it."
        ),
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["reloaded", "failed", "pending", "results"],
                    "properties": {
                        "reloaded": {"type": "integer"},
                        "failed": {"type": "integer"},
                        "pending": {"type": "integer"},
                        "results": {"type": "array", "items": {"type": "object"}},
                    },
                }
            }
        },
    }
}
STATUS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["id", "url", "request", "status"],
    "properties": {
        "id": {"type": "integer", "description": "the request's log position"},
        "event_id": {"type": "string"},
        "request": {"type": "string", "description": "the request event's type"},
        "url": {"type": "string"},
        "status": {"type": "string", "enum": ["queued", "running", "succeeded", "failed"]},
        "queue_position": {"type": "integer", "description": "queued / running only"},
        "outcome": {"type": "string", "description": "the outcome event's type"},
        "name": {"type": "string"},
        "stage": {"type": "string", "description": "failed: the stage (or `abandoned`)"},
        "file": {"type": "string"},
        "line": {"type": "integer"},
        "error": {"type": "string", "description": "failed: the reason"},
        "generation": {"type": "integer"},
    },
}


#: A request refused because the loader's line is full.
QUEUE_FULL: dict[int | str, dict[str, Any]] = {
    429: {
        "description": (
            "The loader's queue holds services.loader.max_queued requests: this one was "
            "refused and nothing was recorded; ask again after Retry-After seconds."
        ),
        "headers": {"Retry-After": {"description": "seconds to wait before asking again"}},
        "model": ErrorBody,
    }
}
#: Largest page of ``GET /admin/loader/requests``.
MAX_PAGE = 1000
CURSOR = re.compile(r"^[0-9]{1,19}$")


#: ``?wait=S``: how long this request waits for its outcome before a 202 (0: answer at once).
WAIT = Query(
    None,
    ge=0,
    le=600,
    description=(
        "seconds to wait for the outcome before answering 202 (default: the server's "
        "services.loader.admin_wait; 0: answer at once unless already done)"
    ),
)


def outcome(record: Recorded, request: Recorded | None = None) -> JSONResponse:
    body = {"outcome": record.type, **record.data}
    if request is not None:
        body.update(id=request.position, url=request_url(request.position))
    if record.type in FAILURES:
        body["status"] = "failed"
        body["detail"] = record.data.get("error", "failed")
        return JSONResponse(body, status_code=422)
    body["status"] = "succeeded"
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

    queue = loader.queue

    def admin_wait(asked: float | None = None) -> float:
        if asked is not None:
            return asked
        wait = loader.settings.admin_wait
        return wait if wait is not None else kernel.settings.request_timeout

    def refused(exc: QueueFull) -> HTTPException:
        return HTTPException(429, str(exc), headers={"Retry-After": str(exc.retry_after)})

    async def admit(asks: list[tuple[Event, str]]) -> list[tuple[Recorded, bool]]:
        """Record each request (a reload joins one of the same plugin already queued),
        all or none: when the new ones do not fit in the line, raise 429."""
        async with queue.merging:
            await queue.sync()  # every request recorded so far is in the line
            joined: list[Recorded | None] = []
            for event, _ in asks:
                queued = None
                if isinstance(event, PluginReloadRequested) and event.name is not None:
                    queued = queue.queued_reload(event.name)
                joined.append(queued)
            new = [event for (event, _), queued in zip(asks, joined, strict=True) if queued is None]
            if new:
                try:
                    queue.check_room(_what(new), len(new))
                except QueueFull as exc:
                    raise refused(exc) from None
            admitted: list[tuple[Recorded, bool]] = []
            for (event, stream), queued in zip(asks, joined, strict=True):
                if queued is not None:
                    loader.paused.discard(queued.data["name"])  # a person asked (the service)
                    admitted.append((queued, True))
                    continue
                rec = (await kernel.append(event, stream=stream, actor=ACTOR))[0]
                admitted.append((rec, False))
            if admitted:
                # recorded all the same (it will run): should the line be behind, follow()
                # says so with its URL, not a 503 that would read as "nothing was done"
                with contextlib.suppress(LineBehind):
                    await queue.sync(max(r.position for r, _ in admitted))
            return admitted

    async def record(event: Event, stream: str) -> tuple[Recorded, bool]:
        return (await admit([(event, stream)]))[0]

    async def follow(request_: Recorded, merged: bool, wait: float) -> tuple[int, dict[str, Any]]:
        """The outcome if it comes within ``wait`` s, else where the request stands (202)."""
        done = await queue.wait(request_, wait)
        if done is None:
            try:
                state = await queue.status(request_)
            except LineBehind as exc:
                # recorded, but its place cannot be read in time: never a wrong place,
                # never an answer that reads as refused (503 with the URL that follows it)
                state = {
                    **describe(request_),
                    "status": "recorded",
                    "merged": merged,
                    "detail": (
                        f"{exc}; the request was recorded (id {request_.position}) and will "
                        f"run: follow {request_url(request_.position)} (do not ask again)"
                    ),
                }
                return 503, state
            if state["status"] in ("queued", "running"):
                state["merged"] = merged
                return 202, state
        else:
            state = {**describe(request_), **outcome_body(done)}
        state["merged"] = merged
        if state["status"] == "failed":
            state.setdefault("detail", state.get("error", "failed"))
            return 422, state
        return 200, state

    def outcome_body(done: Recorded) -> dict[str, Any]:
        body: dict[str, Any] = {"outcome": done.type, "outcome_position": done.position}
        body.update(done.data)
        body["status"] = "failed" if done.type in FAILURES else "succeeded"
        if done.type in FAILURES:
            body["detail"] = done.data.get("error", "failed")
        return body

    async def ask(event: Event, stream: str, wait: float | None) -> JSONResponse:
        request_, merged = await record(event, stream)
        status, body = await follow(request_, merged, admin_wait(wait))
        headers = {"Location": body["url"]} if status in (202, 503) else None
        return JSONResponse(body, status_code=status, headers=headers)

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

    @router.get(
        "/loader/requests",
        summary="The loader's queue: the request in hand and those in line (paged)",
        responses={
            **error_responses(422),
            200: {
                "links": {
                    "FollowFirstQueued": link(
                        "/admin/loader/requests/{request_id}",
                        "get",
                        request_id="$response.body#/queued/0/id",
                    )
                }
            },
        },
    )
    async def list_requests(
        limit: int = Query(
            100, ge=1, le=MAX_PAGE, description=f"most queued requests per page (1-{MAX_PAGE})"
        ),
        cursor: str | None = Query(
            None,
            description="the `next_cursor` of the previous page (the requests after it)",
            # checked below, to answer a cursor this server never gave with a clear 422
            json_schema_extra={"pattern": CURSOR.pattern},
        ),
    ) -> dict[str, Any]:
        after = 0
        if cursor is not None:
            if not CURSOR.fullmatch(cursor):
                raise HTTPException(
                    422,
                    f"cursor {cursor!r} is not one this server gives: pass the `next_cursor` "
                    "of the previous page as it is (or none for the first page)",
                )
            after = int(cursor)
        page, total = await queue.page(after, limit)
        # read after the page's wait for the log: a request taken in hand meanwhile is
        # `running` here, not missing from both (and a finished one not shown running)
        current = queue.current
        last = page[-1][1].position if page else None
        more = last is not None and queue.line.page(last, 1) != []
        return {
            "running": None if current is None else {**describe(current), "queue_position": 0},
            "queued": [{**describe(r), "queue_position": place} for place, r in page],
            "total": total,
            "max_queued": queue.max_queued,
            "next_cursor": str(last) if more else None,
        }

    @router.get(
        "/loader/requests/{request_id}",
        summary="One request to the loader: queued, running, succeeded or failed",
        responses={
            200: {"content": {"application/json": {"schema": STATUS_SCHEMA}}},
            **error_responses(404),
        },
    )
    async def get_request(
        request_id: int = FastPath(..., ge=1, le=2**62, description="the request's id"),
    ) -> dict[str, Any]:
        request_ = await queue.find(request_id)
        if request_ is None:
            raise HTTPException(404, f"no request to the loader at log position {request_id}")
        return await queue.status(request_)

    @router.post(
        "/plugins/reload",
        summary="Reload every enabled plugin",
        responses={**ACCEPTED_ALL, **QUEUE_FULL, **error_responses(422)},
    )
    async def reload_all(wait: float | None = WAIT) -> JSONResponse:
        asked = await admit(
            [
                (PluginReloadRequested(name=name, reason="admin: reload all"), stream_of(name))
                for name in loader.reload_targets()
            ]
        )
        deadline = time.monotonic() + admin_wait(wait)
        results = []
        for request_, merged in asked:
            _, body = await follow(request_, merged, max(0.0, deadline - time.monotonic()))
            results.append(body)
        failed = sum(r["status"] == "failed" for r in results)
        pending = sum(r["status"] in ("queued", "running", "recorded") for r in results)
        body = {
            "reloaded": len(results) - failed - pending,
            "failed": failed,
            "pending": pending,
            "results": results,
        }
        return JSONResponse(body, status_code=202 if pending else 200)

    @router.post(
        "/plugins/{name}/reload",
        summary="Reload one plugin (a new generation)",
        responses={**ACCEPTED, **QUEUE_FULL, **error_responses(404, 409, 422)},
    )
    async def reload_one(name: str, wait: float | None = WAIT) -> JSONResponse:
        require(name)
        if name in loader.table.disabled():
            raise HTTPException(409, f"plugin {name!r} is disabled; enable it first")
        return await ask(PluginReloadRequested(name=name, reason="admin"), stream_of(name), wait)

    @router.post(
        "/plugins/{name}/enable",
        summary="Enable a plugin and load it",
        responses={**ACCEPTED, **QUEUE_FULL, **error_responses(404, 409, 422)},
    )
    async def enable(name: str, wait: float | None = WAIT) -> JSONResponse:
        require(name)
        if name not in loader.table.disabled():
            raise HTTPException(
                409, f"plugin {name!r} is already enabled (reload it to retry a failed load)"
            )
        if not loader.folder(name).is_dir():
            raise HTTPException(404, f"plugin {name!r} is not installed")
        return await ask(PluginEnabled(name=name), stream_of(name), wait)

    @router.post(
        "/plugins/{name}/disable",
        summary="Disable a plugin (unloading it)",
        responses={**ACCEPTED, **QUEUE_FULL, **error_responses(404, 409)},
    )
    async def disable(name: str, wait: float | None = WAIT) -> JSONResponse:
        require(name)
        if name in loader.table.disabled():
            raise HTTPException(409, f"plugin {name!r} is already disabled")
        dependents = loader.dependents(name)
        if dependents:
            raise HTTPException(
                409, f"plugin {name!r} is required by loaded plugin(s) {', '.join(dependents)}"
            )
        if name in loader.loaded:
            return await ask(PluginDisabled(name=name), stream_of(name), wait)
        else:
            rec, _ = await record(PluginDisabled(name=name), stream_of(name))
            await kernel.settle(rec.position)
        return outcome(rec)

    @router.delete(
        "/plugins/{name}",
        summary="Uninstall a plugin (unloading it)",
        responses={**ACCEPTED, **QUEUE_FULL, **error_responses(404, 409, 422)},
    )
    async def uninstall(name: str, wait: float | None = WAIT) -> JSONResponse:
        require(name)
        dependents = loader.dependents(name)
        if dependents:
            raise HTTPException(
                409, f"plugin {name!r} is required by loaded plugin(s) {', '.join(dependents)}"
            )
        return await ask(PluginUninstallRequested(name=name), stream_of(name), wait)

    @router.post(
        "/plugins",
        summary="Install a plugin from an uploaded .zip / .tar.gz",
        responses={**ACCEPTED, **QUEUE_FULL, **error_responses(400, 413, 422)},
    )
    async def install(
        request_: Request,
        file: UploadFile = File(..., description="the plugin archive"),
        replace: bool = Form(False, description="replace an installed plugin of that name"),
        wait: float | None = WAIT,
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
        recorded = False
        try:
            size = await _save(file, folder, path, limit)
            if size > limit:
                raise HTTPException(413, f"the upload exceeds the limit of {limit} bytes")
            # kept until the install is answered (it may be queued): then removed here if
            # answered in time, else by the loader
            asked, _ = await record(
                PluginInstallRequested(source=str(path), replace=replace), PLUGINS_STREAM
            )
            recorded = True
        finally:
            if not recorded:
                await asyncio.to_thread(shutil.rmtree, folder, True)
        status, body = await follow(asked, False, admin_wait(wait))
        body.pop("merged", None)
        if status not in (202, 503):  # answered: the loader is done with the archive (and
            # removes it too); 503: recorded, still to run
            await asyncio.to_thread(shutil.rmtree, folder, True)
        headers = {"Location": body["url"]} if status in (202, 503) else None
        return JSONResponse(body, status_code=status, headers=headers)

    return router


VERBS = {
    PluginReloadRequested: "reload",
    PluginEnabled: "enable",
    PluginDisabled: "disable",
    PluginInstallRequested: "install",
    PluginUninstallRequested: "uninstall",
}


def _what(events: list[Event]) -> str:
    """The requests refused, for the 429's message: what each asked, and of which plugin."""
    said = []
    for e in events:
        verb = VERBS.get(type(e), type(e).__name__)
        name = getattr(e, "name", None)
        if name is not None:
            said.append(f"the {verb} of plugin {name!r}")
        elif isinstance(e, PluginInstallRequested):
            said.append(f"the install of archive {Path(e.source).name!r}")
        else:
            said.append(f"the {verb} of every plugin")
    if len(said) == 1:
        return said[0]
    more = f" and {len(said) - 5} more" if len(said) > 5 else ""
    return f"{len(said)} requests ({', '.join(said[:5])}{more})"


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
