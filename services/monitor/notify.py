"""Webhook notifications: JSON POSTs signed with HMAC-SHA256, retried, never blocking.

Guarantee: handing a notification over never waits (a bounded queue per webhook; a
full queue fails the notification at once); a delivery that still fails after its
retries (exponential backoff) is recorded as ``NotificationFailed`` with the sink and
the error, never dropped silently. The kernel's loop never waits for a webhook.

Request: ``POST <url>`` with a JSON body ``{"id", "type", "position", "recorded_at",
"node", "data"}`` and the headers ``X-Xcore-Event``, ``X-Xcore-Delivery`` (the event
id: receivers dedupe on it; a retried delivery carries the same one),
``X-Xcore-Timestamp`` and, when the webhook has a ``secret``,
``X-Xcore-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">``.
Any 2xx answer is a delivery; anything else (or no answer in ``timeout``) is retried.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import anyio
import httpx
import orjson
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from kernel.events import Recorded
from services.monitor.events import STREAM, NotificationFailed
from services.monitor.settings import WebhookSettings

if TYPE_CHECKING:
    from kernel.kernel import Kernel

__all__ = ["Webhook", "sign"]

log = logging.getLogger("xcore.monitor.notify")


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-Xcore-Signature`` value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def describe_url(url: str) -> str:
    """Scheme, host and path only: credentials and query strings may hold secrets."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class Webhook:
    """One webhook sink: a bounded queue and the worker that delivers from it."""

    def __init__(self, kernel: Kernel, settings: WebhookSettings, queue: int) -> None:
        self.kernel = kernel
        self.settings = settings
        self.name = f"webhook {describe_url(settings.url)}"
        self._send: MemoryObjectSendStream[Recorded]
        self._receive: MemoryObjectReceiveStream[Recorded]
        self._send, self._receive = anyio.create_memory_object_stream[Recorded](queue)
        self.delivered = 0
        self.failed = 0
        self._tg: TaskGroup | None = None
        self._closed = False

    def offer(self, record: Recorded) -> None:
        """Queue ``record`` for delivery without waiting."""
        try:
            self._send.send_nowait(record)
        except (anyio.WouldBlock, anyio.ClosedResourceError):
            self.failed += 1
            log.error("%s: queue full, %s %s not delivered", self.name, record.type, record.meta.id)
            if self._tg is not None:
                self._tg.start_soon(self._record_failure, record, "the delivery queue is full", 0)

    async def run(self) -> None:
        """Deliver queued notifications until cancelled (in the monitor's task group)."""
        if self._closed:
            return  # closed before its worker started: nothing was offered
        async with (
            httpx.AsyncClient(timeout=self.settings.timeout) as client,
            anyio.create_task_group() as tg,
        ):
            self._tg = tg
            try:
                with self._receive:
                    async for record in self._receive:
                        await self._deliver(client, record)
            finally:
                self._tg = None

    async def _deliver(self, client: httpx.AsyncClient, record: Recorded) -> None:
        s = self.settings
        body = orjson.dumps(
            {
                "id": record.meta.id,
                "type": record.type,
                "position": record.position,
                "recorded_at": record.timestamp,
                "node": record.meta.node,
                "data": record.data,
            }
        )
        error = ""
        attempts = 0
        for attempt in range(1, s.retries + 2):
            attempts = attempt
            timestamp = str(int(time.time()))
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "xcore-monitor",
                "X-Xcore-Event": record.type,
                "X-Xcore-Delivery": record.meta.id,
                "X-Xcore-Timestamp": timestamp,
            }
            if s.secret is not None:
                headers["X-Xcore-Signature"] = sign(s.secret.get_secret_value(), timestamp, body)
            try:
                # ``timeout`` bounds the whole attempt (httpx's bounds each read only: a
                # server trickling bytes held the queue forever), and the answer's body
                # is never read (an endless one grew the kernel's memory).
                with anyio.fail_after(s.timeout):
                    async with client.stream("POST", s.url, content=body, headers=headers) as r:
                        status = r.status_code
                if 200 <= status < 300:
                    self.delivered += 1
                    return
                error = f"HTTP {status}"
            except TimeoutError:
                error = f"no answer within {s.timeout}s"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if attempt <= s.retries:
                log.warning(
                    "%s: delivery of %s failed (%s); retry %d/%d",
                    self.name,
                    record.type,
                    error,
                    attempt,
                    s.retries,
                )
                await anyio.sleep(s.backoff * 2 ** (attempt - 1))
        self.failed += 1
        log.error(
            "%s: %s %s not delivered after %d attempt(s): %s",
            self.name,
            record.type,
            record.meta.id,
            attempts,
            error,
        )
        await self._record_failure(record, error, attempts)

    async def _record_failure(self, record: Recorded, error: str, attempts: int) -> None:
        try:
            await self.kernel.append(
                NotificationFailed(
                    sink=self.name,
                    event_id=record.meta.id,
                    event_type=record.type,
                    error=error[:500],
                    attempts=attempts,
                ),
                stream=STREAM,
                actor="monitor",
                cause=record,
            )
        except Exception:
            log.exception("%s: could not record NotificationFailed", self.name)

    def close(self) -> None:
        """No more offers; the worker (if any) delivers what is queued, then ends.

        A hook whose worker never ran closes its receiving end here too, so no stream
        is left for the garbage collector to report."""
        self._closed = True
        self._send.close()
        if self._tg is None:
            self._receive.close()
