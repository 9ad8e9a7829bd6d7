"""The loader's queue of requests: where a request stands, read from the log.

Guarantee: a request the loader accepted (recorded in the log) can always be followed to
its outcome by its log position — ``queued`` (with its place in line), ``running``,
``succeeded`` or ``failed`` (with the failure's stage, file, line and reason) — and a
request recorded before the server (re)started that was never answered says so
(``failed``, stage ``abandoned``) instead of waiting forever. A reload asked for a
plugin whose reload is already waiting in line joins that request (same id) instead of
queueing a second build. The line is bounded (``services.loader.max_queued``): the admin
API refuses a request past it (429) before recording anything, and the refusals are
counted in ``/health`` and logged.

Mechanism: the loader handles its requests one at a time, in log order, through one
subscription (``services/loader/service.py``). The requests waiting are the loader's
request events recorded after the subscription's position, minus the one it handles now
(:attr:`RequestQueue.current`); an outcome names its request by its causation id. One
more subscription of the queue, started at the same position, follows the requests and
their outcomes: it keeps the line in memory (``services/loader/line.py``: places,
merges, pages without reading the log) and the outcomes of the last moments for the
waiters. A request's final status is folded from the log; only ``running`` and the
line are the live state of this process (rebuilt from the log at each start).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import logging
import math
import time
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

from kernel.errors import StoreError
from kernel.events import Recorded

from .events import (
    PluginDisabled,
    PluginEnabled,
    PluginInstalled,
    PluginInstallFailed,
    PluginInstallRequested,
    PluginReloaded,
    PluginReloadFailed,
    PluginReloadRequested,
    PluginRequestSkipped,
    PluginUninstalled,
    PluginUninstallFailed,
    PluginUninstallRequested,
    PluginUnloaded,
    stream_of,
)
from .line import Line

if TYPE_CHECKING:
    from kernel.kernel import Kernel
    from kernel.subscriptions import Subscription

__all__ = [
    "ACTOR",
    "OUTCOMES",
    "REQUESTS",
    "LineBehind",
    "QueueFull",
    "RequestQueue",
    "acts_on",
    "request_url",
]

log = logging.getLogger("xcore.loader")

#: The actor of the loader's own events (its reactions to requests carry the request's ids).
ACTOR = "loader"

#: The request events the loader acts on, in log order.
REQUESTS = (
    PluginReloadRequested,
    PluginEnabled,
    PluginDisabled,
    PluginInstallRequested,
    PluginUninstallRequested,
)
REQUEST_TYPES = frozenset(t.type_name for t in REQUESTS)
#: Requests that are the plugin's new state themselves (folded at the next start when the
#: loader did not act on them before a stop).
STATE_REQUESTS = frozenset(t.type_name for t in (PluginEnabled, PluginDisabled))

#: For each request type, the events that answer it (recorded with the request as cause).
OUTCOMES: dict[str, frozenset[str]] = {
    PluginReloadRequested.type_name: frozenset(
        t.type_name for t in (PluginReloaded, PluginReloadFailed, PluginUninstalled)
    ),
    PluginEnabled.type_name: frozenset(t.type_name for t in (PluginReloaded, PluginReloadFailed)),
    PluginDisabled.type_name: frozenset({PluginUnloaded.type_name}),
    PluginInstallRequested.type_name: frozenset(
        t.type_name for t in (PluginInstallFailed, PluginReloaded, PluginReloadFailed)
    ),
    PluginUninstallRequested.type_name: frozenset(
        t.type_name for t in (PluginUninstalled, PluginUninstallFailed)
    ),
}
# a request that needed nothing done is answered so (recorded by the loader's service)
OUTCOMES = {k: v | {PluginRequestSkipped.type_name} for k, v in OUTCOMES.items()}
OUTCOME_TYPES = frozenset().union(*OUTCOMES.values())
FAILURES = frozenset(
    t.type_name for t in (PluginReloadFailed, PluginInstallFailed, PluginUninstallFailed)
)
#: Records read from the log at a time when the line or an outcome is looked for.
PAGE = 500
#: Outcomes kept for waiters that register after their outcome arrived (a fast answer).
RECENT = 1000
#: How long a route waits for the queue's subscription to reach a position (seconds).
SYNC_TIMEOUT = 10.0
#: Refusals (queue full) are logged at most once per this many seconds, with a count.
REFUSAL_LOG_EVERY = 1.0
#: Requests whose handling time gives the Retry-After of a refusal (a moving mean).
DURATIONS = 20


def request_url(position: int) -> str:
    return f"/admin/loader/requests/{position}"


def acts_on(kernel: Kernel, record: Recorded) -> bool:
    """Whether the loader of this node acts on the request ``record`` (else it skips it)."""
    if record.meta.actor == ACTOR:
        return False  # the loader's own PluginEnabled (after an install), already acted upon
    # a cluster: an install reads a path local to the node that received it, and the
    # cluster service spreads its result; "cluster" requests are node-local
    return not (
        kernel.placement.shared
        and record.meta.node != kernel.node
        and (record.type == PluginInstallRequested.type_name or record.meta.actor == "cluster")
    )


def _name(record: Recorded) -> str | None:
    name = record.data.get("name")
    return name if isinstance(name, str) else None


class LineBehind(StoreError):
    """The queue's subscription did not read the log far enough in time (a 503)."""


class QueueFull(Exception):
    """The line holds ``max_queued`` requests: a new one is refused (nothing recorded)."""

    def __init__(self, what: str, waiting: int, bound: int, retry_after: int) -> None:
        self.waiting = waiting
        self.bound = bound
        self.retry_after = retry_after
        super().__init__(
            f"the loader's queue is full: {waiting} requests are waiting (bound "
            f"services.loader.max_queued = {bound}); {what} was refused and nothing was "
            f"recorded; ask again in about {retry_after} s, or follow the requests in line "
            "(GET /admin/loader/requests)"
        )


class RequestQueue:
    """What the loader has in hand and in line (one per loader)."""

    def __init__(self, kernel: Kernel, max_queued: int = 1000) -> None:
        self.kernel = kernel
        #: Most requests waiting in line; the admin API refuses new ones past it.
        self.max_queued = max_queued
        #: The loader's request subscription (its position: the last request handled).
        self.sub: Subscription | None = None
        #: Where that subscription started: a request at or before it, never answered,
        #: was left by an earlier run of the server.
        self.since = 0
        #: The request the loader handles now.
        self.current: Recorded | None = None
        #: The requests waiting (fed by :attr:`_follower`, cut by :meth:`started`).
        self.line = Line()
        #: Held while a route looks for a queued duplicate and records its request.
        self.merging = asyncio.Lock()
        #: Requests refused because the line was full (since the start), the last one.
        self.refused = 0
        self.last_refused: dict[str, Any] | None = None
        self._refusals_unlogged = 0
        self._refusal_logged_at = -math.inf
        self._started_at = 0.0
        self._durations: collections.deque[float] = collections.deque(maxlen=DURATIONS)
        #: The outcomes of the last moments, by their request's id.
        self._recent: collections.OrderedDict[str, list[Recorded]] = collections.OrderedDict()
        self._waiters: dict[str, list[tuple[frozenset[str], asyncio.Future[Recorded]]]] = {}
        self._follower: Subscription | None = None
        self._syncs: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    async def start(self, sub: Subscription) -> None:
        self.sub = sub
        self.since = sub.position
        self.line = Line(taken=sub.position)
        self._follower = await self.kernel.subscribe(
            self._on_record, types=sorted(OUTCOME_TYPES | REQUEST_TYPES), start=sub.position
        )

    async def stop(self) -> None:
        if self._follower is not None:
            await self.kernel.unsubscribe(self._follower)
            self._follower = None

    def _on_record(self, record: Recorded) -> None:
        if record.type in REQUEST_TYPES:
            if acts_on(self.kernel, record):
                reload_of = (
                    _name(record) if record.type == PluginReloadRequested.type_name else None
                )
                self.line.join(record, reload_of)
            else:
                self.line.see(record.position)
            while self._syncs and self._syncs[0][0] <= record.position:
                _, future = self._syncs.popleft()
                if not future.done():
                    future.set_result(None)
        else:
            self._on_outcome(record)

    async def sync(self, position: int | None = None) -> None:
        """Wait until the line holds every request recorded up to ``position`` (a request
        recorded here), or up to the log's end now (``None``).

        Raises :class:`LineBehind` (the admin API answers 503) when the queue's
        subscription does not get there within ``SYNC_TIMEOUT`` seconds.
        """
        follower = self._follower
        if follower is None:
            return
        target = position
        try:
            if target is None:
                target = await self.kernel.store.last_position()
                if follower.position < target:
                    await follower.wait_for(target, SYNC_TIMEOUT)
                return
            if follower.position >= target or self.line.seen >= target:
                return
            # woken by the follower when it reaches that request (requests come in log
            # order, so the waiters are kept in order of their positions)
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (target, future)
            bisect.insort(self._syncs, entry, key=lambda e: e[0])
            try:
                async with asyncio.timeout(SYNC_TIMEOUT):
                    await future
            finally:
                if entry in self._syncs:
                    self._syncs.remove(entry)
        except (TimeoutError, RuntimeError) as exc:
            log.error(
                "the loader's queue did not read the log up to position %s within %gs "
                "(it is at %s): %s",
                target,
                SYNC_TIMEOUT,
                follower.position,
                exc or type(exc).__name__,
            )
            raise LineBehind(
                f"the loader's queue did not read the log up to position {target} within "
                f"{SYNC_TIMEOUT:g}s (it is at {follower.position}); try again"
            ) from exc

    # -- the request in hand ------------------------------------------------------

    def started(self, record: Recorded) -> None:
        self.current = record
        self.line.take(record.position)
        self._started_at = time.monotonic()

    def finished(self, record: Recorded) -> None:
        if self.current is record:
            self.current = None
            self._durations.append(time.monotonic() - self._started_at)

    # -- the bound ----------------------------------------------------------------

    def check_room(self, what: str, new: int = 1) -> None:
        """Raise :class:`QueueFull` (counted, logged) if ``new`` more requests do not fit."""
        waiting = len(self.line)
        if waiting + new <= self.max_queued:
            return
        retry_after = self.retry_after()
        self.refused += 1
        self.last_refused = {
            "what": what,
            "waiting": waiting,
            "at": time.time(),
        }
        self._refusals_unlogged += 1
        now = time.monotonic()
        if now - self._refusal_logged_at >= REFUSAL_LOG_EVERY:
            others = self._refusals_unlogged - 1
            log.warning(
                "the loader's queue is full (%d waiting, services.loader.max_queued = %d): "
                "refused %s%s",
                waiting,
                self.max_queued,
                what,
                f" (and {others} other request(s) refused since the last such message)"
                if others
                else "",
            )
            self._refusals_unlogged = 0
            self._refusal_logged_at = now
        raise QueueFull(what, waiting, self.max_queued, retry_after)

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the mean handling time of late requests."""
        if not self._durations:
            return 1
        mean = sum(self._durations) / len(self._durations)
        return max(1, min(60, math.ceil(mean)))

    def describe_line(self) -> dict[str, Any]:
        """``/health``'s view of the line."""
        return {
            "queued": len(self.line),
            "max_queued": self.max_queued,
            "refused": self.refused,
            "last_refused": self.last_refused,
        }

    # -- waiting for an outcome ---------------------------------------------------

    def _on_outcome(self, record: Recorded) -> None:
        cause = record.meta.causation_id
        if cause is None:
            return
        self._recent.setdefault(cause, []).append(record)
        self._recent.move_to_end(cause)
        while len(self._recent) > RECENT:
            self._recent.popitem(last=False)
        for answers, future in self._waiters.get(cause, []):
            if record.type in answers and not future.done():
                future.set_result(record)  # the first answer counts (not a dependent's)

    def _known(self, request: Recorded) -> Recorded | None:
        answers = OUTCOMES[request.type]
        for record in self._recent.get(request.meta.id, ()):
            if record.type in answers:
                return record
        return None

    async def wait(self, request: Recorded, timeout: float) -> Recorded | None:
        """The outcome of ``request`` if it arrives within ``timeout`` seconds, else None."""
        known = self._known(request)
        if known is not None:
            return known
        request_id = request.meta.id
        future: asyncio.Future[Recorded] = asyncio.get_running_loop().create_future()
        entry = (OUTCOMES[request.type], future)
        self._waiters.setdefault(request_id, []).append(entry)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            return None
        finally:
            waiters = self._waiters.get(request_id)
            if waiters is not None and entry in waiters:
                waiters.remove(entry)
                if not waiters:
                    del self._waiters[request_id]

    # -- the line -----------------------------------------------------------------

    def _handled_up_to(self) -> int:
        return self.sub.position if self.sub is not None else self.since

    async def waiting(self) -> list[Recorded]:
        """The requests in line (recorded, not yet in hand), oldest first."""
        await self.sync()
        return self.line.waiting()

    async def page(self, after: int, limit: int) -> tuple[list[tuple[int, Recorded]], int]:
        """Up to ``limit`` requests in line recorded after ``after`` (with their places),
        and the length of the whole line."""
        await self.sync()
        return self.line.page(after, limit), len(self.line)

    def queued_reload(self, name: str) -> Recorded | None:
        """A reload of ``name`` waiting in line (not in hand: its files are not read yet);
        :meth:`sync` first."""
        return self.line.reload_of(name)

    async def place(self, request: Recorded) -> int | None:
        """0: in hand; n >= 1: n-th in line; None: no longer in line (taken since)."""
        if self.current is not None and self.current.meta.id == request.meta.id:
            return 0
        await self.sync(request.position)
        if self.current is not None and self.current.meta.id == request.meta.id:
            return 0
        return self.line.place(request.position)

    # -- a request's status, from the log ---------------------------------------

    async def find(self, position: int) -> Recorded | None:
        """The loader request recorded at ``position``, if that is one."""
        if position < 1:
            return None
        batch = await self.kernel.read(after=position - 1, limit=1)
        if not batch or batch[0].position != position or batch[0].type not in REQUEST_TYPES:
            return None
        return batch[0]

    async def outcome_of(self, request: Recorded) -> Recorded | None:
        known = self._known(request)
        if known is not None:
            return known
        answers = OUTCOMES[request.type]
        name = _name(request)
        # a named request is answered on the plugin's stream; an install may be answered
        # on the plugins stream or on the stream of the name its archive declares
        stream = stream_of(name) if name is not None else None
        async for record in _scan(self.kernel, request.position, types=answers, stream=stream):
            if record.meta.causation_id == request.meta.id:
                return record
        return None

    async def status(self, request: Recorded, again: bool = True) -> dict[str, Any]:
        """Where ``request`` stands: queued / running / succeeded / failed."""
        body = describe(request)
        # read what this process knows before the log: an outcome is durable before the
        # loader lets go of its request, so "handled" seen here means the read finds it
        current = self.current
        handled = self._handled_up_to()
        outcome = await self.outcome_of(request)
        if outcome is not None:
            body.update(answer(outcome))
            return body
        if current is not None and current.meta.id == request.meta.id:
            body.update(status="running", queue_position=0)
            return body
        if request.meta.actor == ACTOR:
            # the loader's own record of what it did (a PluginEnabled after an install, a
            # PluginDisabled of a plugin not loaded): never queued, done when recorded
            body.update(status="succeeded", detail="recorded by the loader (done)")
            return body
        if request.position <= self.since and request.type in STATE_REQUESTS:
            # an enable / disable is itself the plugin's new state in the log: the start
            # that followed read it (a disabled plugin is not loaded, an enabled one is)
            body.update(
                status="succeeded",
                detail=(
                    "applied at the server's start (recorded before it; the plugin's "
                    "enabled state is read from the log)"
                ),
            )
            return body
        if request.position <= self.since:
            body.update(
                status="failed",
                stage="abandoned",
                error=(
                    "the server stopped before the loader answered this request (it was "
                    "recorded before the server's last start); nothing of it is pending: "
                    "ask again"
                ),
            )
            return body
        if not acts_on(self.kernel, request):
            body.update(status="succeeded", detail="handled elsewhere (no outcome here)")
            return body
        if request.position <= handled:
            # handled without an outcome event: there was nothing to change (e.g. an
            # enable of a plugin already loaded)
            body.update(status="succeeded", detail="nothing to change")
            return body
        place = await self.place(request)
        if place is None:
            if again:
                # taken in hand since this status was begun: read it again (it moved on)
                return await self.status(request, again=False)
            place = 0
        body.update(
            status="running" if place == 0 else "queued",
            queue_position=place,
        )
        return body


async def _scan(
    kernel: Kernel, after: int, *, types: Iterable[str], stream: str | None = None
) -> AsyncIterator[Recorded]:
    """The records after ``after`` of ``types`` (on ``stream``), read a page at a time."""
    wanted = sorted(types)
    while True:
        batch = await kernel.read(after=after, types=wanted, stream=stream, limit=PAGE)
        for record in batch:
            yield record
        if len(batch) < PAGE:
            return
        after = batch[-1].position


def describe(request: Recorded) -> dict[str, Any]:
    """The request's own part of its status."""
    body: dict[str, Any] = {
        "id": request.position,
        "event_id": request.meta.id,
        "request": request.type,
        "url": request_url(request.position),
        "recorded_at": request.timestamp,
    }
    for key in ("name", "source", "replace", "reason"):
        if key in request.data:
            body[key] = request.data[key]
    return body


def answer(outcome: Recorded) -> dict[str, Any]:
    """An outcome event as the final part of a request's status."""
    failed = outcome.type in FAILURES
    body: dict[str, Any] = {
        "status": "failed" if failed else "succeeded",
        "outcome": outcome.type,
        "outcome_position": outcome.position,
    }
    for key in ("name", "stage", "file", "line", "error", "generation", "version", "detail"):
        value = outcome.data.get(key)
        if value is not None:
            body[key] = value
    if outcome.type == PluginInstalled.type_name:
        body["digest"] = outcome.data.get("digest")
    return body
