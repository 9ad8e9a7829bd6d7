"""Every exception the kernel raises, in one place.

XcoreError
├── SettingsError          a setting is invalid (names the key and the source)
├── EventError
│   ├── UnknownEventType   an event type name nobody registered
│   └── EventTypeConflict  two classes claim one type name
├── StoreError             the log cannot be read or written (names the file)
│   ├── StoreLocked        another process holds the log for writing
│   ├── StoreCorrupt       the file is not an xcore log (truncated, not SQLite, ...)
│   ├── StoreClosed        the store was used after close()
│   └── ConcurrencyError   expected_version did not match (names stream and versions)
├── RequestTimeout         no outcome arrived for a request in time
└── KernelStateError       a Kernel method was called in the wrong state
"""

from __future__ import annotations

__all__ = [
    "ConcurrencyError",
    "EventError",
    "EventTypeConflict",
    "KernelStateError",
    "RequestTimeout",
    "SettingsError",
    "StoreClosed",
    "StoreCorrupt",
    "StoreError",
    "StoreLocked",
    "UnknownEventType",
    "XcoreError",
]


class XcoreError(Exception):
    """Base class of every error raised by xcore."""


class SettingsError(XcoreError):
    """A setting is invalid; the message names the key and where it came from."""


class EventError(XcoreError):
    """An event type or payload is invalid."""


class UnknownEventType(EventError):
    """No event class is registered under this type name."""


class EventTypeConflict(EventError):
    """Two different classes were registered under the same type name."""


class StoreError(XcoreError):
    """The event log could not be read or written."""


class StoreLocked(StoreError):
    """Another process already holds the log open for writing."""


class StoreCorrupt(StoreError):
    """The file is not a readable xcore event log."""


class StoreClosed(StoreError):
    """The store was used after it was closed."""


class ConcurrencyError(StoreError):
    """An append's expected_version did not match the stream's current version."""

    def __init__(self, stream: str, expected: object, actual: int) -> None:
        self.stream = stream
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"stream {stream!r}: expected version {expected}, but it is at version {actual}"
        )


class RequestTimeout(XcoreError):
    """A request event was recorded but no outcome event arrived in time."""


class KernelStateError(XcoreError):
    """A Kernel method was called before start or after stop."""
