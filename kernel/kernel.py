"""The Kernel: owns the event log, runs projections and services, answers requests.

    async with Kernel(Settings(data_dir="var")) as kernel:
        await kernel.append(Greeted(name="ada"), stream="greetings")

Boot order (DESIGN.md "Boot and replay"): open the store, record ``KernelStarted``,
start services in ``order`` (each catches its projections up and subscribes live);
stop is the exact reverse, then ``KernelStopped`` and the store is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import traceback
import uuid
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from kernel.errors import KernelStateError, RequestTimeout, XcoreError
from kernel.events import (
    Event,
    KernelStarted,
    KernelStopped,
    Meta,
    NewEvent,
    Recorded,
    SubscriberFailed,
    new_id,
)
from kernel.hosts import PluginHosts
from kernel.http import HttpSurface
from kernel.logging import flush_logging
from kernel.placement import Alone, Placement
from kernel.projections import Projection, Projector
from kernel.runtime import PluginDirectory
from kernel.services import Service, discover_services
from kernel.settings import Settings
from kernel.store.base import ANY, EventStore
from kernel.store.memory import MemoryStore
from kernel.store.sqlite import SQLiteStore
from kernel.store.sqlite_files import PRIOR_USE
from kernel.subscriptions import Handler, RetryPolicy, Start, Subscription
from kernel.watchdog import Block, LoopBlocked, Watchdog

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["KERNEL_STREAM", "Kernel", "xcore_version"]

log = logging.getLogger("xcore.kernel")

KERNEL_STREAM = "kernel"
P = TypeVar("P", bound=Projection)


@dataclass(frozen=True, slots=True)
class _Waiter:
    """A request waiting for its outcome."""

    names: frozenset[str]
    future: asyncio.Future[Recorded]
    #: only events appended with the request as their cause answer it
    direct_only: bool


def xcore_version() -> str:
    try:
        return version("xcore")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


def store_from_settings(settings: Settings) -> EventStore:
    if settings.store == "memory":
        return MemoryStore()
    if settings.store == "postgres":
        from kernel.store.postgres import PostgresStore

        assert settings.dsn is not None  # the settings refuse postgres without a dsn
        return PostgresStore(settings.dsn.get_secret_value(), scope=settings.node)
    return SQLiteStore(
        settings.database_path,
        synchronous=settings.synchronous,
        allow_new_log=settings.allow_new_log,
        accept_log_loss=settings.accept_log_loss,
        evidence=_prior_use(settings),
    )


def _prior_use(settings: Settings) -> list[Path]:
    """Files whose presence shows the data folder was used: its log cannot be new."""
    evidence = [settings.data_dir / name for name in PRIOR_USE]
    # the plugins' own files (kept across runs), unless that folder is the plugins' code
    state = settings.data_dir / "plugins"
    if state.resolve() != settings.plugins_dir.resolve():
        evidence.append(state)
    return evidence


class Kernel:
    """The microkernel. Use as ``async with Kernel(...) as kernel`` or through ``lifespan``."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        store: EventStore | None = None,
        services: Sequence[Service] | None = None,
    ) -> None:
        self.settings = settings if settings is not None else Settings.load()
        self.store = store if store is not None else store_from_settings(self.settings)
        self._services: list[Service] | None = list(services) if services is not None else None
        self.node = self.settings.node
        self.boot = uuid.uuid4().hex
        self.version = xcore_version()
        #: Routes and ASGI apps services contribute to the HTTP shell.
        self.http = HttpSurface()
        #: Loaded plugin generations (published by the loader, read by other services).
        self.plugins = PluginDirectory()
        #: Who runs plugins of a mode other than trusted (the sandbox service registers).
        self.hosts = PluginHosts()
        #: Which node claims once-only work first (the cluster service replaces it).
        self.placement: Placement = Alone()
        self.started = False
        self._store_ready = False
        self._stack: AsyncExitStack | None = None
        self._subscriptions: list[Subscription] = []
        self._projectors: dict[str, Projector] = {}
        self._waiters: dict[str, _Waiter] = {}
        self._outcomes: Subscription | None = None
        #: Services by name, once started.
        self.services: dict[str, Service] = {}
        self.http.add_health_check("store", self._store_health)
        #: Reports (and records) an event loop blocked too long; see kernel/watchdog.py.
        self.watchdog = Watchdog(self.settings.loop_block_threshold, self.settings.stop_grace)

    # -- life cycle ------------------------------------------------------------------

    async def __aenter__(self) -> Kernel:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self.started:
            raise KernelStateError("the kernel is already started")
        services = (
            self._services
            if self._services is not None
            else discover_services(self.settings.enabled_services)
        )
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            await self.store.open()
            self._store_ready = True
            stack.push_async_callback(self._close_store)
            stack.push_async_callback(self._record_stopped)
            stack.push_async_callback(self._stop_subscriptions)
            await self.append(
                KernelStarted(
                    node=self.node, boot=self.boot, version=self.version, pid=os.getpid()
                ),
                stream=KERNEL_STREAM,
                actor="kernel",
            )
            self._outcomes = await self.subscribe(
                self._dispatch_outcome, start="now", name=None, retry=RetryPolicy(max_attempts=1)
            )
            await self.watchdog.start(self._record_block)
            stack.push_async_callback(self.watchdog.stop)
            self.http.add_health_check("event_loop", self._loop_health)
            for service in services:
                try:
                    await service.start(self, stack)
                except Exception as exc:
                    raise XcoreError(f"service {service.name!r} failed to start: {exc}") from exc
                self.services[service.name] = service
                log.debug("service %s started", service.name)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        self.started = True
        self.watchdog.started()
        log.info(
            "kernel started (node %s, boot %s, log %s, services: %s)",
            self.node,
            self.boot[:8],
            self.store.location,
            ", ".join(self.services) or "none",
        )

    async def stop(self) -> None:
        if not self.started or self._stack is None:
            return
        self.started = False
        stack, self._stack = self._stack, None
        for waiter in self._waiters.values():
            if not waiter.future.done():
                waiter.future.set_exception(
                    KernelStateError("the kernel stopped before the outcome")
                )
        self._waiters.clear()
        await stack.aclose()
        self.services.clear()
        log.info("kernel stopped (boot %s)", self.boot[:8])

    async def _record_stopped(self) -> None:
        try:
            await self.append(
                KernelStopped(node=self.node, boot=self.boot), stream=KERNEL_STREAM, actor="kernel"
            )
        except Exception:
            log.exception("could not record KernelStopped")

    async def _record_block(self, block: Block) -> None:
        await self.append(
            LoopBlocked(
                duration_ms=block.duration_ms,
                plugin=block.plugin,
                file=block.file,
                line=block.line,
                stack=block.stack,
            ),
            stream=KERNEL_STREAM,
            actor="kernel",
        )

    async def _loop_health(self) -> tuple[bool, dict[str, Any]]:
        return True, self.watchdog.health()

    async def _stop_subscriptions(self) -> None:
        for projector in reversed(list(self._projectors.values())):
            await projector.stop()
        # together: each lets its running handler finish (within its grace), so the
        # whole stop waits one grace at most, not one per subscription
        await asyncio.gather(*(sub.stop() for sub in reversed(self._subscriptions)))
        self._subscriptions.clear()

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        """FastAPI lifespan: ``FastAPI(lifespan=kernel.lifespan)`` embeds the kernel."""
        # The app's own routes keep priority: plugins may not claim their paths.
        self.http.reserve_app_routes(app)
        try:
            async with self:
                self.http.attach(app, self)
                yield
        finally:
            # uvicorn re-raises SIGTERM once shut down: write the last lines out first
            flush_logging()

    def _require_started(self) -> None:
        # True from the moment the store is open, so services may append while starting.
        if not self._store_ready:
            raise KernelStateError("the kernel is not started (use `async with Kernel(...)`)")

    async def _store_health(self) -> tuple[bool, dict[str, Any]]:
        """The store's own verdict: failing (503) while its appends fail."""
        return self.store.health()

    async def _close_store(self) -> None:
        self._store_ready = False
        await self.store.close()

    # -- the log ---------------------------------------------------------------------

    async def append(
        self,
        events: Event | NewEvent | Sequence[Event | NewEvent],
        *,
        stream: str,
        expected_version: int | None = ANY,
        actor: str | None = None,
        cause: Recorded | None = None,
        correlation_id: str | None = None,
    ) -> list[Recorded]:
        """Append events to ``stream``; returns once they are durable.

        ``cause`` is the event this one reacts to: its correlation id is carried on and
        its id becomes the causation id, so a request's outcomes can be found.
        """
        self._require_started()
        items = [events] if isinstance(events, (Event, NewEvent)) else list(events)
        new = [
            item
            if isinstance(item, NewEvent)
            else NewEvent.of(item, self._meta(actor, cause, correlation_id), explicit_id=False)
            for item in items
        ]
        return await self.store.append(new, stream=stream, expected_version=expected_version)

    def _meta(
        self,
        actor: str | None,
        cause: Recorded | None,
        correlation_id: str | None = None,
        id: str | None = None,
    ) -> Meta:
        """Metadata of an event this kernel records, carrying ``cause``'s correlation."""
        causation_id = None
        if cause is not None:
            cause_meta = cause.meta
            correlation_id = correlation_id or cause_meta.correlation_id or cause_meta.id
            causation_id = cause_meta.id
        return Meta(
            id=id or new_id(),
            correlation_id=correlation_id,
            causation_id=causation_id,
            actor=actor,
            node=self.node,
            boot=self.boot,
        )

    async def read(
        self,
        *,
        after: int = 0,
        types: Collection[str] | None = None,
        stream: str | None = None,
        limit: int | None = None,
    ) -> list[Recorded]:
        self._require_started()
        return await self.store.read(after=after, types=types, stream=stream, limit=limit)

    async def subscribe(
        self,
        handler: Handler,
        *,
        name: str | None = None,
        start: Start | None = None,
        types: Collection[type[Event] | str] | None = None,
        retry: RetryPolicy | None = None,
        batch_size: int = 500,
    ) -> Subscription:
        """Start delivering events to ``handler``; the kernel stops it when it stops.

        ``start`` defaults to the saved checkpoint for a named subscription and to
        "now" otherwise; pass 0 to read the whole log first.
        """
        if start is None:
            start = "checkpoint" if name is not None else "now"
        type_names = (
            None if types is None else [t if isinstance(t, str) else t.type_name for t in types]
        )
        sub = Subscription(
            self.store,
            handler,
            name=name,
            start=start,
            types=type_names,
            retry=retry,
            batch_size=batch_size,
            dead_letter=self._dead_letter,
        )
        await sub.start()
        self._subscriptions.append(sub)
        return sub

    async def unsubscribe(self, sub: Subscription) -> None:
        await sub.stop()
        with contextlib.suppress(ValueError):
            self._subscriptions.remove(sub)

    async def _dead_letter(
        self, subscriber: str, record: Recorded, exc: BaseException, attempts: int
    ) -> None:
        await self.append(
            SubscriberFailed(
                subscriber=subscriber,
                position=record.position,
                event_type=record.type,
                event_id=record.meta.id,
                error=f"{type(exc).__name__}: {exc}",
                traceback="".join(traceback.format_exception(exc)),
                attempts=attempts,
            ),
            stream=KERNEL_STREAM,
            actor="kernel",
            cause=record,
        )

    # -- projections -------------------------------------------------------------------

    async def add_projection(self, projection: P) -> P:
        """Catch ``projection`` up and keep it live until the kernel stops."""
        if projection.name in self._projectors:
            raise XcoreError(f"a projection named {projection.name!r} is already running")
        projector = Projector(self.store, projection, dead_letter=self._dead_letter)
        await projector.start()
        self._projectors[projection.name] = projector
        return projection

    def projector(self, name: str) -> Projector:
        try:
            return self._projectors[name]
        except KeyError:
            raise XcoreError(
                f"no projection named {name!r}; running: {', '.join(self._projectors) or 'none'}"
            ) from None

    def projection(self, cls: type[P]) -> P:
        """The running instance of projection class ``cls``."""
        p = self.projector(cls.name).projection
        if not isinstance(p, cls):
            raise XcoreError(f"projection {cls.name!r} is a {type(p).__name__}, not {cls.__name__}")
        return p

    async def settle(self, position: int | None = None, timeout: float = 10.0) -> None:
        """Wait until every projection has folded the log up to ``position`` (default: now)."""
        target = position if position is not None else await self.store.last_position()
        for projector in self._projectors.values():
            await projector.wait_for(target, timeout)

    # -- requests ----------------------------------------------------------------------

    async def request(
        self,
        event: Event,
        *,
        stream: str,
        outcomes: Collection[type[Event] | str],
        timeout: float | None = None,
        actor: str | None = None,
        cause: Recorded | None = None,
    ) -> Recorded:
        """Record ``event`` and wait for the first outcome event answering it.

        An outcome answers a request when it was appended with ``cause=<the request>``
        (its causation id is the request's id) or, for a request without ``cause``,
        when it carries the request's correlation id further down the chain. With
        ``cause`` the request joins that event's correlation, so only direct answers
        count: a sibling request of the same chain never takes another's outcome.
        """
        self._require_started()
        names = frozenset(o if isinstance(o, str) else o.type_name for o in outcomes)
        request_id = new_id()
        meta = self._meta(actor, cause, None if cause is not None else request_id, request_id)
        waiter = _Waiter(names, asyncio.get_running_loop().create_future(), cause is not None)
        self._waiters[request_id] = waiter
        try:
            await self.store.append([NewEvent.of(event, meta, explicit_id=False)], stream=stream)
            wait = timeout if timeout is not None else self.settings.request_timeout
            try:
                return await asyncio.wait_for(waiter.future, wait)
            except TimeoutError:
                raise RequestTimeout(
                    f"{event.type_name} on {stream!r} was recorded (id {request_id}) but no "
                    f"outcome ({', '.join(sorted(names))}) arrived within {wait:g}s"
                ) from None
        finally:
            self._waiters.pop(request_id, None)

    def _dispatch_outcome(self, record: Recorded) -> None:
        if not self._waiters:
            return
        meta = record.meta
        waiter = self._waiters.get(meta.causation_id) if meta.causation_id else None
        if waiter is None:
            correlation = meta.correlation_id
            if correlation is None or correlation == meta.id:
                return
            waiter = self._waiters.get(correlation)
            if waiter is None or waiter.direct_only:
                return
        if record.type in waiter.names and not waiter.future.done():
            waiter.future.set_result(record)

    def describe(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "boot": self.boot,
            "version": self.version,
            "store": self.store.location,
            "services": list(self.services),
            "projections": {n: p.projection.position for n, p in self._projectors.items()},
        }
