"""The log as a sandboxed plugin sees it: ``ctx.append`` and ``ctx.subscribe`` over the wire.

Guarantees:

- a sandboxed plugin appends only to streams of its own (``plugin-<name>`` and
  ``plugin-<name>.<anything>``), only event types of its own (never a type registered in
  the kernel's process: the kernel's, a service's or a trusted plugin's, so it cannot
  forge the events others react to), always as actor ``plugin:<name>``; event data is a
  JSON object of at most :data:`MAX_EVENT_BYTES`. A refused append raises in the
  plugin's code with the reason and records nothing;
- it receives, live, the new events of the types it subscribes to (all when it names
  none), one at a time and in log order; the kernel's and services' own events (tokens,
  other plugins' life) are delivered only when the operator lists their types in
  ``services.sandbox.kernel_events``; events of its own streams always are;
- a subscription lives as long as the worker that made it: a restarted worker runs
  ``on_load`` again and subscribes anew (events recorded in between are not delivered,
  as for a trusted plugin's reload).

Mechanism: the worker sends ``append`` and ``subscribe`` frames with ids of its own; the
worker process object (:mod:`.worker_process`) runs them through this bridge in its task
group and answers ``appended`` / ``subscribed``. A delivery is a call into the worker
(``event``) awaited by the kernel's subscription, so a slow handler holds its
subscription back instead of queueing events without bound, and a handler that raises
is retried and dead-lettered like a trusted one (``SubscriberFailed``).
"""

from __future__ import annotations

import functools
import importlib
import logging
import pkgutil
import re
from collections.abc import Awaitable, Callable, Collection
from typing import TYPE_CHECKING, Any

import orjson

from kernel.events import Meta, NewEvent, Recorded, registry

if TYPE_CHECKING:
    from kernel.kernel import Kernel
    from kernel.subscriptions import Subscription

__all__ = ["MAX_EVENT_BYTES", "Bridge", "Refused", "record_to_wire"]

log = logging.getLogger("xcore.sandbox")

#: Largest event data a sandboxed plugin may append (its JSON).
MAX_EVENT_BYTES = 1024 * 1024
#: Subscriptions one worker may hold.
MAX_SUBSCRIPTIONS = 64
_TYPE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]{0,199}")
_STREAM_TAIL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,119}")


class Refused(Exception):
    """The plugin asked for something a sandboxed plugin may not do (message says what)."""


@functools.cache
def _register_service_events() -> None:
    """Import every installed service's ``events`` module, so the types of services not
    started in this process are known (and refused) too."""
    import services

    for info in pkgutil.iter_modules(services.__path__):
        if info.ispkg:
            try:
                importlib.import_module(f"services.{info.name}.events")
            except ModuleNotFoundError:
                continue
            except Exception:
                log.exception("sandbox: cannot import services.%s.events", info.name)


def _owned_by_kernel(type_name: str) -> bool:
    cls = registry.get(type_name)
    return cls is not None and cls.__module__.split(".", 1)[0] in ("kernel", "services")


def record_to_wire(record: Recorded) -> dict[str, Any]:
    """A recorded event as an ``event`` frame's fields."""
    meta = record.meta
    return {
        "position": record.position,
        "stream": record.stream,
        "version": record.version,
        "type": record.type,
        "schema": record.schema,
        "data": record.data,
        "timestamp": record.timestamp,
        "meta": {
            "id": meta.id,
            "correlation_id": meta.correlation_id,
            "causation_id": meta.causation_id,
            "actor": meta.actor,
            "node": meta.node,
            "boot": meta.boot,
        },
    }


class Bridge:
    """The kernel's side of one sandboxed plugin's appends and subscriptions."""

    def __init__(
        self,
        kernel: Kernel,
        plugin: str,
        kernel_events: Collection[str],
        owners: dict[str, str] | None = None,
    ) -> None:
        self.kernel = kernel
        self.plugin = plugin
        self.kernel_events = frozenset(kernel_events)
        self.own = f"plugin-{plugin}"
        #: Event type -> the sandboxed plugin that appends it (shared by every bridge of
        #: one kernel): the types of sandboxed plugins are not in the kernel's registry.
        self.owners = owners if owners is not None else {}
        _register_service_events()

    def stream(self, stream: Any) -> str:
        """The stream an append goes to, checked (default: ``plugin-<name>``)."""
        if stream is None:
            return self.own
        if not isinstance(stream, str) or not (
            stream == self.own
            or (
                stream.startswith(self.own + ".")
                and _STREAM_TAIL.fullmatch(stream[len(self.own) + 1 :])
            )
        ):
            raise Refused(
                f"plugin {self.plugin!r} is sandboxed: it appends only to its own streams "
                f"({self.own!r} or {self.own + '.<name>'!r}, <name> in letters, digits and "
                f"_.:-), not to {stream!r}"
            )
        return stream

    def check_type(self, type_name: Any) -> str:
        if not isinstance(type_name, str) or not _TYPE_NAME.fullmatch(type_name):
            raise Refused(f"plugin {self.plugin!r}: {type_name!r} is not a valid event type name")
        cls = registry.get(type_name)
        if cls is not None:
            raise Refused(
                f"plugin {self.plugin!r} is sandboxed: event type {type_name!r} belongs to "
                f"{cls.__module__} in the kernel's process; a sandboxed plugin appends only "
                "event types of its own"
            )
        return type_name

    def claim(self, type_name: str) -> None:
        """Refuse a type another sandboxed plugin appended first in this kernel process
        (first come, as for the kernel's registry of trusted types)."""
        owner = self.owners.setdefault(type_name, self.plugin)
        if owner != self.plugin:
            raise Refused(
                f"plugin {self.plugin!r} is sandboxed: event type {type_name!r} belongs to "
                f"sandboxed plugin {owner!r}; a sandboxed plugin appends only event types "
                "of its own"
            )

    async def append(self, stream: Any, type_name: Any, schema: Any, data: bytes) -> list[Recorded]:
        """Record one event of the plugin (raises :class:`Refused`)."""
        target = self.stream(stream)
        name = self.check_type(type_name)
        if not isinstance(schema, int) or isinstance(schema, bool) or not 1 <= schema <= 1_000_000:
            raise Refused(f"plugin {self.plugin!r}: event schema {schema!r} is not an int >= 1")
        if len(data) > MAX_EVENT_BYTES:
            raise Refused(
                f"plugin {self.plugin!r}: event {name!r} has {len(data)} bytes of data, more "
                f"than the sandbox's limit of {MAX_EVENT_BYTES}"
            )
        try:
            decoded = orjson.loads(data)
        except orjson.JSONDecodeError:
            decoded = None
        if not isinstance(decoded, dict):
            raise Refused(f"plugin {self.plugin!r}: event {name!r}: its data is not a JSON object")
        self.claim(name)
        kernel = self.kernel
        meta = Meta(actor=f"plugin:{self.plugin}", node=kernel.node, boot=kernel.boot)
        new = NewEvent(type=name, data=data, meta=meta, schema=schema)
        return await kernel.append(new, stream=target)

    def types(self, types: Any) -> list[str] | None:
        if types is None:
            return None
        if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
            raise Refused(f"plugin {self.plugin!r}: subscribe(types=...) must name event types")
        return list(types)

    def visible(self, record: Recorded) -> bool:
        """Whether the plugin may see ``record``."""
        if record.stream == self.own or record.stream.startswith(self.own + "."):
            return True
        return not _owned_by_kernel(record.type) or record.type in self.kernel_events

    async def subscribe(
        self, deliver: Callable[[Recorded], Awaitable[None]], types: list[str] | None
    ) -> Subscription:
        async def handler(record: Recorded) -> None:
            if self.visible(record):
                await deliver(record)

        handler.__qualname__ = f"sandboxed-plugin:{self.plugin}"
        return await self.kernel.subscribe(handler, types=types, start="now")

    async def unsubscribe(self, sub: Subscription) -> None:
        """End ``sub`` at once (its worker is gone: a handler in flight cannot finish)."""
        await sub.stop(grace=0.0)
        await self.kernel.unsubscribe(sub)
