"""A small client of a running kernel's admin API, for the command-line tools and scripts.

Standard library only (the CLI must not need httpx): one call, JSON in and out, and a
clear :class:`ServerUnreachable` instead of a traceback when nothing answers.

:func:`follow` subscribes to a Server-Sent Events stream of the admin API (the live
event stream, the live log stream) and hands each message to a callback, resuming
after a disconnect where it stopped (``Last-Event-ID``), so the callback sees every
message once, in order, across reconnects::

    from kernel.client import follow

    def handle(message):                 # message.id, message.event, message.data
        print(message.id, message.event, message.data["data"])

    follow("http://127.0.0.1:8000", token, handle,
           path="/events/stream", params={"type": ["TaskFailed"]}, after=0)

It blocks (run it in a thread to do something else meanwhile) until the callback
returns ``False``, ``stop`` is set, or the server refuses the request (a 4xx answer:
wrong token, bad filter), which raises :class:`StreamRefused`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

from kernel.errors import XcoreError

__all__ = ["SSEMessage", "ServerUnreachable", "StreamRefused", "admin_call", "follow", "iter_sse"]

log = logging.getLogger("xcore.client")


class ServerUnreachable(XcoreError):
    """No xcore server answered at the given address."""


def admin_call(
    base_url: str,
    token: str,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    content_type: str | None = None,
    timeout: float = 30.0,
) -> tuple[int, Any]:
    """``method`` on ``<base_url>/admin<path>``; returns (status, decoded JSON body)."""
    base = base_url.rstrip("/")
    req = urllib.request.Request(base + "/admin" + path, data=body, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    if content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, {"detail": raw.decode("utf-8", "replace")}
    except urllib.error.URLError as exc:
        raise ServerUnreachable(f"no xcore server answers at {base} ({exc.reason})") from None
    except (ConnectionError, TimeoutError) as exc:
        raise ServerUnreachable(f"no xcore server answers at {base} ({exc})") from None


class StreamRefused(XcoreError):
    """The server answered the stream request with an error (it will not change by retrying)."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


@dataclass(frozen=True, slots=True)
class SSEMessage:
    id: int | None
    event: str
    #: the decoded JSON of the ``data`` field (the raw text if it is not JSON)
    data: Any


def iter_sse(lines: Iterable[bytes], *, positions: bool = False) -> Iterator[SSEMessage]:
    """Parse a Server-Sent Events byte stream, line by line; comments are skipped.

    With ``positions``, a block that sets an ``id`` without data (the stream's start and
    heartbeats) is yielded too, as a message with ``event`` "" and ``data`` None.
    """
    event_id: int | None = None
    event = "message"
    data: list[str] = []
    id_seen = False
    for raw in lines:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data:
                text = "\n".join(data)
                try:
                    value: Any = json.loads(text)
                except ValueError:
                    value = text
                yield SSEMessage(event_id, event, value)
            elif positions and id_seen:
                yield SSEMessage(event_id, "", None)
            event, data, id_seen = "message", [], False
            continue
        if line.startswith(":"):
            continue
        name, _, value_text = line.partition(":")
        value_text = value_text[1:] if value_text.startswith(" ") else value_text
        if name == "data":
            data.append(value_text)
        elif name == "event":
            event = value_text
        elif name == "id":
            id_seen = True
            try:
                event_id = int(value_text)
            except ValueError:
                event_id = None


def follow(
    base_url: str,
    token: str,
    callback: Callable[[SSEMessage], bool | None],
    *,
    path: str = "/events/stream",
    params: Mapping[str, str | int | list[str]] | None = None,
    after: int | None = None,
    stop: threading.Event | None = None,
    read_timeout: float = 60.0,
    max_delay: float = 30.0,
    max_failures: int | None = None,
) -> int | None:
    """Follow ``<base_url>/admin<path>``, resuming after disconnects; returns the last id.

    ``after`` starts after that id (default: from now on). Reconnects wait 0.5s,
    doubling up to ``max_delay``; ``max_failures`` consecutive failed connections end
    it with :class:`ServerUnreachable` (default: retry forever).
    """
    last: int | None = after
    failures = 0
    query: list[tuple[str, str]] = []
    for key, value in (params or {}).items():
        values = value if isinstance(value, list) else [value]
        query += [(key, str(v)) for v in values]
    while stop is None or not stop.is_set():
        url = base_url.rstrip("/") + "/admin" + path
        q = list(query)
        if last is not None:
            q.append(("after", str(last)))
        if q:
            url += "?" + urllib.parse.urlencode(q)
        req = urllib.request.Request(url, method="GET")
        req.add_header("Authorization", f"Bearer {token}")
        req.add_header("Accept", "text/event-stream")
        if last is not None:
            req.add_header("Last-Event-ID", str(last))
        try:
            with urllib.request.urlopen(req, timeout=read_timeout) as resp:
                failures = 0
                for message in iter_sse(_lines(resp), positions=True):
                    if message.id is not None:
                        last = message.id
                    if message.data is None and not message.event:
                        continue  # a position without an event (start, heartbeat)
                    if callback(message) is False:
                        return last
                    if stop is not None and stop.is_set():
                        return last
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                detail = json.loads(raw).get("detail", raw.decode("utf-8", "replace"))
            except (ValueError, AttributeError):
                detail = raw.decode("utf-8", "replace")
            if 400 <= exc.code < 500:
                raise StreamRefused(exc.code, detail) from None
            failures += 1
        except (urllib.error.URLError, OSError) as exc:
            failures += 1
            log.info("stream %s interrupted (%s); resuming after %s", path, exc, last)
        if max_failures is not None and failures >= max_failures:
            raise ServerUnreachable(f"no xcore server answers at {base_url} ({failures} tries)")
        delay = min(max_delay, 0.5 * 2 ** max(0, failures - 1)) if failures else 0.0
        if stop is not None:
            if stop.wait(delay):
                break
        elif delay:
            time.sleep(delay)
    return last


def _lines(resp: IO[bytes]) -> Iterator[bytes]:
    while True:
        line = resp.readline()
        if not line:
            return
        yield line
