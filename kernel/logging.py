"""Logging that never blocks the event loop and never crashes the process.

Records go through a queue to one background thread that writes them, so a slow
terminal or a full pipe never stalls the loop, and the writer copes with any stdout:
a terminal, a pipe, a regular file (``xcore serve > log.txt``), or a closed stream.
(aiologger's stream handler raises on regular files; the standard library's handlers
do not, which is why they are used here.)

Secrets registered with :func:`redact` are replaced by ``***`` in every line.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import logging.handlers
import queue
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

__all__ = ["configure_logging", "flush_logging", "redact"]

_SECRETS: set[str] = set()
_listener: logging.handlers.QueueListener | None = None

#: attributes every LogRecord has; anything else was passed with ``extra=``
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "color_message",  # uvicorn's ANSI-coloured copy of the message
}


def redact(secret: str) -> None:
    """Never let ``secret`` appear in a log line."""
    if secret:
        _SECRETS.add(secret)


def _scrub(text: str) -> str:
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, "***")
    return text


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in sorted(extras.items()))
        return _scrub(line)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in _STANDARD:
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        return _scrub(orjson.dumps(out, default=str).decode())


class SafeStreamHandler(logging.StreamHandler[TextIO]):
    """A stream handler for any stream; a broken stream is reported once, not raised."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._broken = False

    def emit(self, record: logging.LogRecord) -> None:
        if self._broken:
            return
        try:
            self.stream.write(self.format(record) + self.terminator)
            self.stream.flush()
        except (OSError, ValueError) as exc:
            # stdout was closed or its reader went away: keep the process alive and say
            # so once on stderr if that still works.
            self._broken = True
            with contextlib.suppress(OSError, ValueError, AttributeError):
                sys.__stderr__.write(f"xcore: logging to {self.stream!r} stopped: {exc!r}\n")  # type: ignore[union-attr]


class _QueueHandler(logging.handlers.QueueHandler):
    """Hands records to the writer thread with their traceback kept apart from the message."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        copy = logging.makeLogRecord(vars(record))
        copy.msg = record.getMessage()
        copy.args = None
        if record.exc_info and not record.exc_text:
            copy.exc_text = _TRACEBACKS.formatException(record.exc_info)
        copy.exc_info = None
        return copy


_TRACEBACKS = logging.Formatter()


def configure_logging(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Route every ``logging`` record through a background writer thread."""
    global _listener
    if _listener is not None:
        _listener.stop()
    handler = SafeStreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    _listener = logging.handlers.QueueListener(q, handler, respect_handler_level=False)
    _listener.start()
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(_QueueHandler(q))
    root.setLevel(level)
    atexit.register(_stop)


def flush_logging() -> None:
    """Write out every queued record now (before a process may die by a signal)."""
    if _listener is not None and _listener._thread is not None:
        _listener.stop()
        _listener.start()


def _stop() -> None:
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None
