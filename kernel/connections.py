"""The connection guard: idle, slow and surplus connections cannot pile up.

Guarantees of ``xcore serve`` (uvicorn alone gives none of the first two):

- a client has ``header_timeout`` seconds to send a whole request head, counted from
  the moment its connection opens; after a response, ``keep_alive_timeout`` plus
  ``header_timeout`` (the idle allowance, then the head's); a connection that sends
  nothing, or trickles its headers (slowloris), is closed after that;
- an idle keep-alive connection is closed after ``keep_alive_timeout`` (uvicorn's own
  timer, set from the same settings);
- at most ``max_connections`` connections are open at once: one more is answered 503
  with ``Connection: close`` and closed at once, before any of its bytes are read;
- a client that stops reading its response (the server's send buffer stays full) for
  ``send_timeout`` seconds is closed, so it cannot hold a connection (and the response
  buffered for it) forever: without this, clients that send requests for large answers
  and never read them would keep ``max_connections`` slots taken for good.

Mechanism: a subclass of uvicorn's HTTP protocol (h11, or httptools when installed),
given to ``uvicorn.Config(http=...)``. uvicorn creates one protocol object per
connection and keeps the open ones in ``server_state.connections``; the head timer is
armed when the connection opens and after each response, and disarmed by the next
request cycle (uvicorn creates a cycle when a whole head has arrived). The send timer is
armed when the transport asks the protocol to pause writing (its buffer is over the
high-water mark) and disarmed when it may resume. Refused and
timed-out connections are counted and logged once per interval, not one line each.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time
from typing import Any

from kernel.settings import HttpSettings

__all__ = ["ConnectionStats", "guarded_protocol"]

log = logging.getLogger("xcore.http")

_REFUSED_BODY = b'{"detail":"too many open connections; try again later"}'
REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"content-type: application/json\r\n"
    b"connection: close\r\n"
    b"retry-after: 1\r\n"
    b"content-length: " + str(len(_REFUSED_BODY)).encode() + b"\r\n\r\n" + _REFUSED_BODY
)


class ConnectionStats:
    """Counts of connections the guard closed, logged at most once per ``interval``."""

    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        self.refused = 0
        self.timed_out = 0
        self.stalled = 0
        self._logged = {"refused": 0, "timed_out": 0, "stalled": 0}
        self._last = -interval

    def count(self, kind: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            new = {k: getattr(self, k) - v for k, v in self._logged.items()}
            self._logged = {k: getattr(self, k) for k in self._logged}
            log.warning(
                "closed connections: %d over the connection limit, %d too slow to send "
                "a request head, %d not reading their response (logged at most every %gs)",
                new["refused"],
                new["timed_out"],
                new["stalled"],
                self.interval,
            )


def _base_protocol() -> type[Any]:
    """The protocol uvicorn's ``http="auto"`` would pick."""
    if importlib.util.find_spec("httptools") is not None:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    from uvicorn.protocols.http.h11_impl import H11Protocol

    return H11Protocol


def guarded_protocol(limits: HttpSettings, stats: ConnectionStats | None = None) -> type[Any]:
    """A uvicorn HTTP protocol class enforcing ``limits`` (see the module docstring)."""
    base = _base_protocol()
    counts = stats if stats is not None else ConnectionStats()
    header_timeout = limits.header_timeout
    #: After a response the connection may idle ``keep_alive_timeout`` (uvicorn closes it
    #: then if nothing came), and the next head has ``header_timeout`` once it begins.
    next_head_timeout = limits.keep_alive_timeout + limits.header_timeout
    max_connections = limits.max_connections
    send_timeout = limits.send_timeout

    class GuardedProtocol(base):  # type: ignore[misc, valid-type]
        stats = counts
        _head_timer: asyncio.TimerHandle | None = None
        _head_cycle: Any = None
        _send_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(REFUSED)
                transport.close()
                counts.count("refused")
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._head_timer is not None and (
                self.cycle is not self._head_cycle  # a whole head arrived
                or self.transport.get_protocol() is not self  # upgraded (WebSocket)
            ):
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm(next_head_timeout)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            self._resumed()
            super().connection_lost(exc)

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._send_timer is None:
                self._send_timer = self.loop.call_later(send_timeout, self._stalled)

        def resume_writing(self) -> None:
            super().resume_writing()
            self._resumed()

        def _resumed(self) -> None:
            if self._send_timer is not None:
                self._send_timer.cancel()
                self._send_timer = None

        def _stalled(self) -> None:
            self._send_timer = None
            if not self.transport.is_closing():
                counts.count("stalled")
                self.transport.abort()  # a graceful close would wait for the buffer

        def _arm(self, timeout: float = header_timeout) -> None:
            self._disarm()
            self._head_cycle = self.cycle
            self._head_timer = self.loop.call_later(timeout, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.transport.is_closing():
                return
            if self.cycle is not self._head_cycle or (
                self.cycle is not None and not self.cycle.response_complete
            ):
                return  # a request is being served: its head arrived in time
            counts.count("timed_out")
            self.transport.close()

    GuardedProtocol.__name__ = GuardedProtocol.__qualname__ = f"Guarded{base.__name__}"
    return GuardedProtocol
