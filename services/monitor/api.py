"""HTTP routes of the monitor: ``/metrics`` and the admin routes for logs, streams, stats, alerts.

Admin inputs are strict: a bad value, or a query parameter the route does not know,
is answered 422 naming it (FastAPI's error shape: ``detail[].loc``).
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response
from fastapi.responses import StreamingResponse

from services.monitor.logstore import LogQuery
from services.monitor.metrics import CONTENT_TYPE, render, stats_json

if TYPE_CHECKING:
    from kernel.kernel import Kernel
    from services.monitor.service import MonitorService

__all__ = ["admin_router", "metrics_router"]

Level = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _only(*allowed: str) -> Any:
    """A dependency refusing query parameters outside ``allowed`` (422 naming them)."""
    known = frozenset(allowed)

    def check(request: Request) -> None:
        unknown = [k for k in request.query_params if k not in known]
        if unknown:
            raise HTTPException(
                status_code=422,
                detail=[
                    {
                        "loc": ["query", k],
                        "msg": f"unknown query parameter (known: {', '.join(sorted(known))})",
                        "type": "extra_forbidden",
                    }
                    for k in unknown
                ],
            )

    return Depends(check)


def _last_event_id(value: str | None) -> int | None:
    if value is None or value.strip() == "":
        return None
    text = value.strip()
    # ASCII digits only: int() would also take "1_000", "+3" and non-ASCII digits.
    position = int(text) if text.isascii() and text.isdigit() and len(text) <= 20 else -1
    if position < 0:
        raise HTTPException(
            status_code=422,
            detail=[
                {
                    "loc": ["header", "Last-Event-ID"],
                    "msg": "must be a non-negative integer (an id this stream sent)",
                    "type": "value_error",
                }
            ],
        )
    return position


def _not_beyond(start: int, head: int, what: str) -> None:
    """Refuse a resume point past the end: the stream would wait, silent, until it is reached."""
    if start > head:
        raise HTTPException(
            status_code=422,
            detail=[
                {
                    "loc": ["header", "Last-Event-ID"],
                    "msg": f"{start} is beyond the last {what} ({head}); it was not sent by "
                    "this server (was its data reset?)",
                    "type": "value_error",
                }
            ],
        )


_LOG_FILTERS = ("plugin", "task", "run_id", "request_id", "logger", "level", "since", "until", "q")


def _log_query(
    plugin: str | None = Query(None, max_length=100, description="only this plugin's lines"),
    task: str | None = Query(None, max_length=200, description="only this task's lines"),
    run_id: str | None = Query(None, max_length=100, description="only this task run's lines"),
    request_id: str | None = Query(None, max_length=128, description="only this request's"),
    logger: str | None = Query(None, max_length=200, description="this logger and its children"),
    level: Level | None = Query(None, description="this level and above"),
    since: float | datetime | None = Query(
        None, description="Unix seconds or an ISO 8601 time, inclusive"
    ),
    until: float | datetime | None = Query(
        None, description="Unix seconds or an ISO 8601 time, exclusive"
    ),
    q: str | None = Query(None, max_length=200, description="text in the message (any case)"),
) -> LogQuery:
    return LogQuery(
        plugin=plugin,
        task=task,
        run_id=run_id,
        request_id=request_id,
        logger=logger,
        level=level,
        since=_seconds(since, "since"),
        until=_seconds(until, "until"),
        q=q,
    )


def _seconds(value: float | datetime | None, name: str) -> float | None:
    if isinstance(value, float) and not math.isfinite(value):
        # "nan" matched no line and "inf" every or none: a silent empty answer.
        raise HTTPException(
            status_code=422,
            detail=[
                {
                    "loc": ["query", name],
                    "msg": "must be a finite number of Unix seconds or an ISO 8601 time",
                    "type": "value_error",
                }
            ],
        )
    return value.timestamp() if isinstance(value, datetime) else value


def _while_authorized(
    kernel: Kernel, request: Request, frames: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    """``frames`` until the API token that opened the stream is revoked or expires
    (checked at each frame, heartbeats included): a live stream outlived its token."""
    principal = str(getattr(request.state, "admin_principal", "admin"))
    if not principal.startswith("token:"):
        return frames
    from services.admin.tokens import AdminTokens

    token_id = principal.removeprefix("token:")

    async def guarded() -> AsyncIterator[bytes]:
        async for frame in frames:
            record = kernel.projection(AdminTokens).tokens.get(token_id)
            if record is None or not record.active(time.time()):
                return
            yield frame

    return guarded()


def admin_router(monitor: MonitorService) -> APIRouter:
    router = APIRouter(tags=["monitor"])
    kernel = monitor.kernel

    @router.get(
        "/logs",
        summary="Stored log lines, newest first, with stable cursor pagination",
        dependencies=[_only(*_LOG_FILTERS, "limit", "cursor")],
    )
    async def logs(
        query: LogQuery = Depends(_log_query),
        limit: int = Query(100, ge=1, le=1000),
        cursor: int | None = Query(
            None, ge=1, description="next_cursor of the previous page: lines older than it"
        ),
    ) -> dict[str, Any]:
        lines, more = await monitor.logs.query(query, limit=limit, before=cursor)
        return {
            "lines": lines,
            "next_cursor": lines[-1]["id"] if more and lines else None,
            "store": monitor.logs.describe(),
        }

    @router.get(
        "/logs/stream",
        summary="Log lines live (Server-Sent Events); resume with Last-Event-ID",
        dependencies=[_only(*_LOG_FILTERS, "after")],
        response_class=StreamingResponse,
    )
    async def logs_stream(
        request: Request,
        query: LogQuery = Depends(_log_query),
        after: int | None = Query(
            None, ge=0, description="start after this line id (default: new lines only)"
        ),
        last_event_id: str | None = Header(None, alias="Last-Event-ID"),
    ) -> StreamingResponse:
        start = _last_event_id(last_event_id)
        if start is None:
            start = after if after is not None else monitor.logs.last_id
        _not_beyond(start, monitor.logs.last_id, "log line id")
        return StreamingResponse(
            _while_authorized(kernel, request, monitor.streams.logs(monitor.logs, start, query)),
            media_type="text/event-stream",
            headers=_SSE_HEADERS,
        )

    @router.get(
        "/events/stream",
        summary="Events of the log live (Server-Sent Events); resume with Last-Event-ID",
        dependencies=[_only("after", "type", "stream", "plugin")],
        response_class=StreamingResponse,
    )
    async def events_stream(
        request: Request,
        after: int | None = Query(
            None, ge=0, description="start after this position (0: the whole log; default: now)"
        ),
        type: list[str] | None = Query(None, max_length=100, description="only these types"),
        stream: str | None = Query(None, max_length=200, description="only this stream"),
        plugin: str | None = Query(None, max_length=100, description="only about this plugin"),
        last_event_id: str | None = Header(None, alias="Last-Event-ID"),
    ) -> StreamingResponse:
        start = _last_event_id(last_event_id)
        head = await kernel.store.last_position()
        if start is None:
            start = after if after is not None else head
        _not_beyond(start, head, "log position")
        return StreamingResponse(
            _while_authorized(
                kernel, request, monitor.streams.events(kernel, start, type, stream, plugin)
            ),
            media_type="text/event-stream",
            headers=_SSE_HEADERS,
        )

    @router.get("/stats", summary="Metrics as JSON", dependencies=[_only()])
    async def stats() -> dict[str, Any]:
        sample = await monitor.sample()
        return {**stats_json(monitor, sample), "streams": monitor.streams.describe()}

    @router.get("/alerts", summary="Open alerts and recent episodes", dependencies=[_only("limit")])
    async def alerts(limit: int = Query(50, ge=1, le=200)) -> dict[str, Any]:
        book = monitor.alerts
        return {
            "open": sorted(book.open.values(), key=lambda a: a["position"]),
            "recent": list(reversed(book.recent))[:limit],
            "rules": [r.model_dump() for r in monitor.settings.alerts.rules],
        }

    return router


def metrics_router(monitor: MonitorService) -> APIRouter:
    router = APIRouter(tags=["monitor"])

    @router.get(
        "/metrics",
        summary="Prometheus metrics (text exposition format)",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE: {}}}},
    )
    async def metrics() -> Response:
        text = render(monitor, await monitor.sample())
        return Response(text.encode(), media_type=CONTENT_TYPE)

    return router
