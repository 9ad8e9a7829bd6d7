"""The ASGI proxy the router mounts for a sandboxed plugin: HTTP over the worker's pipes.

The plugin's FastAPI router runs inside its worker; this app forwards each request to it
and streams the answer back, faithfully: method, path, query string, every header
(repeated ones in order), the body in chunks both ways, the status and the response
headers as the plugin's app sent them. A request body larger than
``services.sandbox.max_body_mb`` is refused with 413 (by its ``content-length`` before
anything is sent, or as soon as a streamed body passes the limit).

When the plugin cannot answer the proxy answers itself, in JSON, naming the plugin:
503 while no worker serves (restarting, circuit open: ``Retry-After`` when a restart is
coming), 504 when the call broke the plugin's wall time, 502 when the worker died while
answering. A response already started when the worker dies is cut (the client sees an
incomplete body), never completed with made-up bytes.

``openapi()`` returns the schema the worker built from the plugin's router, so the
router mounter merges it into ``/openapi.json`` like any plugin's.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import anyio
import orjson
from starlette.types import Message, Receive, Scope, Send

from .protocol import CHUNK, WINDOW_BYTES, WINDOW_FRAMES
from .supervisor import SandboxedPlugin, Unavailable
from .worker_process import Worker, WorkerGone

__all__ = ["SandboxProxy"]

log = logging.getLogger("xcore.sandbox")

#: Added to every answer of a sandboxed plugin. Its pages share the kernel's origin, so a
#: script in one could read the admin page's session (``/admin/ui/session``) from an
#: operator's browser and act as them; a CSP sandbox without ``allow-same-origin`` gives
#: such a document an opaque origin of its own. It adds to the plugin's own policy (the
#: browser enforces both) and does nothing to JSON or other non-document answers.
SANDBOXED_ORIGIN = b"sandbox allow-scripts allow-forms allow-popups allow-downloads allow-modals"


class SandboxProxy:
    """ASGI app forwarding HTTP requests to a sandboxed plugin's worker."""

    def __init__(
        self, plugin: SandboxedPlugin, max_body: int, openapi: dict[str, Any] | None
    ) -> None:
        self.plugin = plugin
        self.max_body = max_body
        self._openapi = openapi

    def openapi(self) -> dict[str, Any]:
        return self._openapi or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await send(
                {
                    "type": "websocket.close",
                    "code": 1003,
                    "reason": "websockets are not proxied to sandboxed plugins",
                }
            )
            return
        if scope["type"] != "http":
            return
        name = self.plugin.name
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body:
            await _answer(
                send,
                413,
                f"plugin {name!r}: the request body ({declared} bytes) exceeds the limit of {self.max_body} bytes",
            )
            return
        try:
            worker = self.plugin.serving()
        except Unavailable as exc:
            headers = [(b"retry-after", b"1")] if self.plugin.state == "restarting" else []
            await _answer(send, 503, str(exc), headers)
            return
        first = await receive()
        body = first.get("body", b"") if first["type"] == "http.request" else b""
        more = bool(first.get("more_body")) if first["type"] == "http.request" else False
        if len(body) > self.max_body:
            await _answer(
                send,
                413,
                f"plugin {name!r}: the request body exceeds the limit of {self.max_body} bytes",
            )
            return
        relay = _Relay(send)
        try:
            async with worker.open_call(
                {"op": "http", "scope": _scope(scope), "more": more or len(body) > CHUNK},
                body[:CHUNK],
                label=f"request {scope['method']} {scope['path']}",
                cancel=False,
            ) as (cid, frames):
                # a first message larger than one frame goes in pieces
                rest = [body[i : i + CHUNK] for i in range(CHUNK, len(body), CHUNK)]
                for i, piece in enumerate(rest):
                    await worker.send_body(cid, piece, more or i < len(rest) - 1)
                failure: Exception | None = None
                if more:
                    # the body keeps coming while the answer may already start
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._pump, worker, cid, receive, len(body), relay)
                        try:
                            await relay.run(frames, worker, cid)
                        except Exception as exc:  # raised after the group, not wrapped in it
                            failure = exc
                        tg.cancel_scope.cancel()
                    if failure is not None:
                        raise failure
                elif await relay.run(frames, worker, cid, until_streaming=True):
                    # a streamed answer: watch for the client leaving while it lasts (an
                    # answer in one piece needs no watcher, nor its task)
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._pump, worker, cid, receive, len(body), relay, False)
                        try:
                            await relay.run(frames, worker, cid)
                        except Exception as exc:
                            failure = exc
                        tg.cancel_scope.cancel()
                    if failure is not None:
                        raise failure
                if relay.too_big and not relay.started:
                    await _answer(
                        send,
                        413,
                        f"plugin {name!r}: the request body exceeds the limit of {self.max_body} bytes",
                    )
                    return
                if not relay.started:
                    await _answer(
                        send, 500, f"plugin {name!r}: its app ended the request without a response"
                    )
        except WorkerGone as exc:
            self.plugin.stats.observe("http", False, 0.0)
            if relay.started:
                raise RuntimeError(
                    f"plugin {name!r}: its worker ended during the response: {exc.why}"
                ) from None
            status = 504 if exc.exit is not None and exc.exit.limit == "wall" else 502
            await _answer(send, status, f"plugin {name!r}: {exc.why}")
            return
        self.plugin.stats.observe("http", relay.ok, relay.cpu_ms)

    async def _pump(
        self,
        worker: Worker,
        cid: int,
        receive: Receive,
        size: int,
        relay: _Relay,
        more: bool = True,
    ) -> None:
        """Forward the rest of the body (if ``more``), then a disconnect if the client
        leaves."""
        while True:
            message: Message = await receive()
            if message["type"] == "http.disconnect":
                await worker.send_frame({"op": "disconnect", "id": cid})
                return
            if not more:
                continue
            chunk = message.get("body", b"")
            more = bool(message.get("more_body"))
            size += len(chunk)
            if size > self.max_body:
                relay.too_big = True
                await worker.send_frame({"op": "disconnect", "id": cid})
                return
            for i in range(0, max(len(chunk), 1), CHUNK):
                last = i + CHUNK >= len(chunk)
                await worker.send_body(cid, chunk[i : i + CHUNK], more or not last)


class _Relay:
    """Passes a call's response frames on to the client."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.started = False
        self.ok = False
        self.cpu_ms = 0.0
        #: The request body passed the limit (the answer becomes a 413).
        self.too_big = False

    async def run(
        self, frames: Any, worker: Worker, cid: int, *, until_streaming: bool = False
    ) -> bool:
        """Pass the frames on, giving the worker its window back as the client takes
        them, until the ``result`` (False) or, with ``until_streaming``, until a body
        frame says more is coming (True)."""
        send = self.send
        owed_frames = owed_bytes = 0
        while True:
            h, payload = await frames.receive()
            op = h.get("op")
            if op == "start" or op == "whole":
                if self.too_big:
                    continue
                self.started = True
                await send(
                    {
                        "type": "http.response.start",
                        "status": int(h["status"]),
                        "headers": [
                            *(
                                (k.encode("latin-1"), v.encode("latin-1"))
                                for k, v in h.get("headers", [])
                            ),
                            (b"content-security-policy", SANDBOXED_ORIGIN),
                        ],
                    }
                )
                if op == "whole":  # the start and the whole body in one frame
                    await send({"type": "http.response.body", "body": payload})
            elif op == "body":
                if self.started:
                    await send(
                        {
                            "type": "http.response.body",
                            "body": payload,
                            "more_body": bool(h.get("more")),
                        }
                    )
                if not h.get("more"):
                    continue  # the response is whole: the worker waits for nothing more
                # the client took it (the server's send waits while the socket is full)
                owed_frames += 1
                owed_bytes += len(payload)
                if (
                    owed_frames >= WINDOW_FRAMES // 4
                    or owed_bytes >= WINDOW_BYTES // 4
                    or not frames.pending()
                ):
                    worker.credit(cid, owed_frames, owed_bytes)
                    owed_frames = owed_bytes = 0
                if until_streaming and h.get("more") and self.started:
                    if owed_frames:
                        worker.credit(cid, owed_frames, owed_bytes)
                    return True
            elif op == "result":
                self.ok = bool(h.get("ok"))
                self.cpu_ms = float(h.get("cpu_ms", 0.0))
                return False


def _content_length(scope: Scope) -> int | None:
    for key, value in scope["headers"]:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


#: Where the router's dispatcher leaves the request's id (it echoes it as x-request-id).
REQUEST_ID_KEY = "xcore.request_id"


def _scope(scope: Scope) -> dict[str, Any]:
    request_id = scope.get(REQUEST_ID_KEY)
    if not isinstance(request_id, str):
        request_id = None
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                request_id = value.decode("latin-1")[:128]
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": scope.get("http_version", "1.1"),
        "method": scope["method"],
        "scheme": scope.get("scheme", "http"),
        "path": scope["path"],
        "raw_path": (scope.get("raw_path") or scope["path"].encode()).decode("latin-1"),
        "query_string": scope.get("query_string", b"").decode("latin-1"),
        "root_path": scope.get("root_path", ""),
        "headers": [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]],
        "client": list(scope["client"]) if scope.get("client") else None,
        "server": list(scope["server"]) if scope.get("server") else None,
        "xcore_request_id": request_id or uuid.uuid4().hex[:16],
    }


async def _answer(
    send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = orjson.dumps({"detail": detail})
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
