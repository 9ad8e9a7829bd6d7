"""Logging that never blocks the event loop and never crashes the process.

Records go through a queue to one background thread that writes them, so a slow
terminal or a full pipe never stalls the loop, and the writer copes with any stdout:
a terminal, a pipe, a regular file (``xcore serve > log.txt``), or a closed stream.
(aiologger's stream handler raises on regular files; the standard library's handlers
do not, which is why they are used here.)

Secrets registered with :func:`redact` are replaced by ``***`` in every line.

Structured capture: every record also becomes a :data:`LogLine` (a plain dict: time,
level, logger, plugin, task, run id, request id, message, extra fields, exception text)
handed to the sinks registered with :func:`add_sink` (the monitor's bounded log store).
The request id and the plugin come from :data:`request_id_var` / :data:`plugin_var`
(set by the router's dispatcher around a plugin request), the task and run id from the
record's extras or the running task's context; they are read in the thread that logs,
so a line carries them even though it is written later by the writer thread. Sinks run
in the writer thread and must not block (they buffer and return).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import logging.handlers
import queue
import sys
import threading
from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

__all__ = [
    "LogLine",
    "LogSink",
    "add_sink",
    "configure_logging",
    "flush_logging",
    "plugin_var",
    "redact",
    "remove_sink",
    "request_id_var",
]

_SECRETS: set[str] = set()
_listener: logging.handlers.QueueListener | None = None
#: True while the listener also writes to a stream (configure_logging was called).
_streaming = False

#: The id of the HTTP request being served (set by the router's dispatcher).
request_id_var: ContextVar[str | None] = ContextVar("xcore_request_id", default=None)
#: The plugin whose code is running (set by the router's dispatcher around a request).
plugin_var: ContextVar[str | None] = ContextVar("xcore_log_plugin", default=None)

#: One structured log line (see the module docstring for its keys).
LogLine = dict[str, Any]
#: Receives structured lines in the writer thread; must return quickly.
LogSink = Callable[[LogLine], None]
_sinks: list[LogSink] = []
_sinks_lock = threading.Lock()
#: extras copied to their own fields of a LogLine rather than kept in ``extra``
_LIFTED = ("plugin", "task", "run_id", "request_id")
_PLUGIN_LOGGER = "xcore.plugin."

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


#: Control characters (and Unicode line breaks) shown escaped in a text log line, so a
#: value from outside (a plugin folder named ``"x\nERROR forged"``, a header, a task
#: argument) can never start a line of its own.
_ESCAPES = {
    **{c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, 0x85] if c != 0x09},
    0x0A: "\\n",
    0x0D: "\\r",
    0x2028: "\\u2028",
    0x2029: "\\u2029",
}


class TextFormatter(logging.Formatter):
    """One line per record (its message and extras escaped), then any traceback as
    Python prints it (the JSON format is the one to parse: every value is quoted there)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        extras = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in sorted(extras.items()))
        return line.translate(_ESCAPES)

    def format(self, record: logging.LogRecord) -> str:
        return _scrub(super().format(record))


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
    """Hands records to the writer thread with their traceback kept apart from the message,
    and the request/plugin/task context of the logging thread attached."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        copy = logging.makeLogRecord(vars(record))
        copy.msg = record.getMessage()
        copy.args = None
        if record.exc_info and not record.exc_text:
            copy.exc_text = _TRACEBACKS.formatException(record.exc_info)
        copy.exc_info = None
        if not hasattr(copy, "request_id"):
            request_id = request_id_var.get()
            if request_id is not None:
                copy.request_id = request_id
        if not hasattr(copy, "plugin"):
            plugin = plugin_var.get()
            if plugin is None and record.name.startswith(_PLUGIN_LOGGER):
                plugin = record.name[len(_PLUGIN_LOGGER) :].split(".", 1)[0]
            if plugin is not None:
                copy.plugin = plugin
        if not hasattr(copy, "run_id"):
            task = _task_context()
            if task is not None:
                copy.run_id = task.run_id
                if not hasattr(copy, "task"):
                    copy.task = task.task_id
        return copy


def _task_context() -> Any:
    # imported late: kernel.sdk is not needed to log, and importing it here at module
    # level would tie the two modules' import order together
    sdk = sys.modules.get("kernel.sdk")
    return None if sdk is None else sdk.task_context_var.get()


_TRACEBACKS = logging.Formatter()


def to_line(record: logging.LogRecord) -> LogLine:
    """The structured form of a prepared record (secrets redacted)."""
    fields = vars(record)
    extra: dict[str, Any] = {}
    for k, v in fields.items():
        if k in _STANDARD or k in _LIFTED:
            continue
        extra[k] = v if isinstance(v, (str, int, float, bool)) or v is None else _scrub(str(v))
    exc = record.exc_text
    return {
        "ts": record.created,
        "level": record.levelname,
        "levelno": record.levelno,
        "logger": record.name,
        "plugin": _str_or_none(fields.get("plugin")),
        "task": _str_or_none(fields.get("task")),
        "run_id": _str_or_none(fields.get("run_id")),
        "request_id": _str_or_none(fields.get("request_id")),
        "message": _scrub(record.getMessage()),
        "extra": extra,
        "exc": _scrub(exc) if exc else None,
    }


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


class _SinkHandler(logging.Handler):
    """Runs in the writer thread: hands each record's structured line to every sink."""

    def emit(self, record: logging.LogRecord) -> None:
        sinks = _sinks
        if not sinks:
            return
        try:
            line = to_line(record)
        except Exception:  # a record that cannot be described must not stop logging
            return
        for sink in sinks:
            try:
                sink(line)
            except Exception as exc:
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    sys.__stderr__.write(f"xcore: a log sink failed: {exc!r}\n")  # type: ignore[union-attr]


def add_sink(sink: LogSink) -> None:
    """Hand every log line from now on to ``sink`` (in the writer thread).

    Works whether or not :func:`configure_logging` was called: without it, records are
    captured (at the loggers' own levels) but not written to a stream.
    """
    with _sinks_lock:
        if sink not in _sinks:
            # replaced, never mutated: the writer thread iterates without the lock
            globals()["_sinks"] = [*_sinks, sink]
        if _listener is None:
            _start(None, None)


def remove_sink(sink: LogSink) -> None:
    with _sinks_lock:
        globals()["_sinks"] = [s for s in _sinks if s is not sink]


def configure_logging(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Route every ``logging`` record through a background writer thread."""
    handler = SafeStreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    _start(handler, level)


def _start(handler: logging.Handler | None, level: str | None) -> None:
    global _listener, _streaming
    if _listener is not None:
        _listener.stop()
    handlers: list[logging.Handler] = [_SinkHandler()]
    if handler is not None:
        handlers.insert(0, handler)
    q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    _listener = logging.handlers.QueueListener(q, *handlers, respect_handler_level=False)
    _listener.start()
    _streaming = handler is not None
    root = logging.getLogger()
    for old in list(root.handlers):
        if handler is not None or isinstance(old, _QueueHandler):
            root.removeHandler(old)
    root.addHandler(_QueueHandler(q))
    if level is not None:
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
