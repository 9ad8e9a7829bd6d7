"""The loader's queue of requests: where a request stands, read from the log.

Guarantee: a request the loader accepted (recorded in the log) can always be followed to
its outcome by its log position — ``queued`` (with its place in line), ``running``,
``succeeded`` or ``failed`` (with the failure's stage, file, line and reason) — and a
request recorded before the server (re)started that was never answered says so
(``failed``, stage ``abandoned``) instead of waiting forever. A reload asked for a
plugin whose reload is already waiting in line joins that request (same id) instead of
queueing a second build.

Mechanism: the loader handles its requests one at a time, in log order, through one
subscription (``services/loader/service.py``). So the requests waiting are the loader's
request events recorded after the subscription's position, minus the one it handles now
(:attr:`RequestQueue.current`); an outcome names its request by its causation id. The
status of a request is folded from those events (nothing is kept in memory but the
request in hand and the outcomes of the last moments, for the waiters); only
``running`` is the live state of this process.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from kernel.kernel import Kernel
    from kernel.subscriptions import Subscription

__all__ = ["ACTOR", "OUTCOMES", "REQUESTS", "RequestQueue", "acts_on", "request_url"]

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


class RequestQueue:
    """What the loader has in hand and in line (one per loader)."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        #: The loader's request subscription (its position: the last request handled).
        self.sub: Subscription | None = None
        #: Where that subscription started: a request at or before it, never answered,
        #: was left by an earlier run of the server.
        self.since = 0
        #: The request the loader handles now.
        self.current: Recorded | None = None
        #: Held while a route looks for a queued duplicate and records its request.
        self.merging = asyncio.Lock()
        #: The outcomes of the last moments, by their request's id.
        self._recent: collections.OrderedDict[str, list[Recorded]] = collections.OrderedDict()
        self._waiters: dict[str, list[tuple[frozenset[str], asyncio.Future[Recorded]]]] = {}
        self._outcomes: Subscription | None = None

    async def start(self, sub: Subscription) -> None:
        self.sub = sub
        self.since = sub.position
        self._outcomes = await self.kernel.subscribe(
            self._on_outcome, types=sorted(OUTCOME_TYPES), start=sub.position
        )

    async def stop(self) -> None:
        if self._outcomes is not None:
            await self.kernel.unsubscribe(self._outcomes)
            self._outcomes = None

    # -- the request in hand ------------------------------------------------------

    def started(self, record: Recorded) -> None:
        self.current = record

    def finished(self, record: Recorded) -> None:
        if self.current is record:
            self.current = None

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

    async def waiting(self, up_to: int | None = None) -> list[Recorded]:
        """The requests in line (recorded, not yet in hand), oldest first."""
        current = self.current.position if self.current is not None else None
        after = max(self._handled_up_to(), current or 0)
        line: list[Recorded] = []
        async for record in _scan(self.kernel, after, types=REQUEST_TYPES):
            if up_to is not None and record.position > up_to:
                break
            if record.position != current and acts_on(self.kernel, record):
                line.append(record)
        return line

    async def queued_reload(self, name: str) -> Recorded | None:
        """A reload of ``name`` waiting in line (not in hand: its files are not read yet)."""
        for record in await self.waiting():
            if record.type == PluginReloadRequested.type_name and _name(record) == name:
                return record
        return None

    async def place(self, request: Recorded) -> int:
        """0: in hand; n >= 1: n-th in line."""
        if self.current is not None and self.current.meta.id == request.meta.id:
            return 0
        line = await self.waiting(up_to=request.position)
        return 1 + sum(r.position < request.position for r in line)

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

    async def status(self, request: Recorded) -> dict[str, Any]:
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
        body.update(status="queued", queue_position=await self.place(request))
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
