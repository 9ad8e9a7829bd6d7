"""xcore's kernel: the embedding API.

    from kernel import Kernel, Settings, Event

Everything listed in ``__all__`` is public and stable; the rest is internal.
"""

from __future__ import annotations

from kernel.errors import (
    ConcurrencyError,
    KernelStateError,
    RequestTimeout,
    SettingsError,
    StoreClosed,
    StoreCorrupt,
    StoreError,
    StoreLocked,
    XcoreError,
)
from kernel.events import (
    Event,
    KernelStarted,
    KernelStopped,
    Meta,
    NewEvent,
    Recorded,
    SubscriberFailed,
    registry,
    upcaster,
)
from kernel.http import HttpSurface, create_app
from kernel.kernel import Kernel
from kernel.projections import Projection, handles, state_at
from kernel.services import Service
from kernel.settings import Settings
from kernel.store import ANY, NO_STREAM, EventStore, MemoryStore, Snapshot, SQLiteStore
from kernel.subscriptions import RetryPolicy, Subscription

__all__ = [
    "ANY",
    "NO_STREAM",
    "ConcurrencyError",
    "Event",
    "EventStore",
    "HttpSurface",
    "Kernel",
    "KernelStarted",
    "KernelStateError",
    "KernelStopped",
    "MemoryStore",
    "Meta",
    "NewEvent",
    "Projection",
    "Recorded",
    "RequestTimeout",
    "RetryPolicy",
    "SQLiteStore",
    "Service",
    "Settings",
    "SettingsError",
    "Snapshot",
    "StoreClosed",
    "StoreCorrupt",
    "StoreError",
    "StoreLocked",
    "SubscriberFailed",
    "Subscription",
    "XcoreError",
    "create_app",
    "handles",
    "registry",
    "state_at",
    "upcaster",
]
