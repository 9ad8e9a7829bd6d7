"""Projections: state folded from the log by pure handlers.

A projection declares handlers for the event types it cares about; the kernel feeds it
every such event in order, from its last snapshot (or from zero), then live. Because a
projection is a pure fold, it can be rebuilt from zero at any time and computed as it
was at any past position — which is what the replay tool does.

    class PluginTable(Projection):
        name = "plugins"

        def reset(self) -> None:
            self.loaded: dict[str, int] = {}

        @handles("PluginLoaded")
        def _loaded(self, r: Recorded) -> None:
            self.loaded[r.data["name"]] = r.data["generation"]

Handlers receive the :class:`~kernel.events.Recorded` envelope: ``r.data`` is the
payload dict (fast), ``r.event`` the typed model (validated on demand).
"""

from __future__ import annotations

import asyncio
import bisect
import gc
import logging
import math
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import orjson

from kernel.errors import StoreError, XcoreError
from kernel.events import Event, LeanRecorded, LeanRows, Recorded, registry
from kernel.store.base import EventStore, Snapshot
from kernel.subscriptions import DeadLetter, Subscription

__all__ = ["Projection", "Projector", "folding", "handles", "state_at"]

log = logging.getLogger("xcore.projections")

P = TypeVar("P", bound="Projection")
HandlerFn = Callable[[Any, Recorded], None]


def handles(*types: type[Event] | str) -> Callable[[HandlerFn], HandlerFn]:
    """Mark a projection method as the handler of these event types."""
    names = [t if isinstance(t, str) else t.type_name for t in types]

    def mark(fn: HandlerFn) -> HandlerFn:
        existing: list[str] = getattr(fn, "__xcore_handles__", [])
        fn.__xcore_handles__ = [*existing, *names]  # type: ignore[attr-defined]
        return fn

    return mark


class Projection:
    """Base class: subclasses set ``name``, override ``reset`` and add handlers."""

    #: Unique name; also the key of its snapshot and checkpoint.
    name: ClassVar[str] = ""
    #: Bump when the state's shape changes: older snapshots are then ignored.
    schema: ClassVar[int] = 1
    #: Save a snapshot every this many handled events (0: never).
    snapshot_every: ClassVar[int] = 0

    _handlers: ClassVar[dict[str, HandlerFn]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("name"):
            cls.name = cls.__name__
        handlers: dict[str, HandlerFn] = {}
        for klass in reversed(cls.__mro__):
            for attr in vars(klass).values():
                for type_name in getattr(attr, "__xcore_handles__", ()):
                    handlers[type_name] = attr
        cls._handlers = handlers

    def __init__(self) -> None:
        self.position = 0
        self.reset()

    def reset(self) -> None:
        """Set the initial (empty) state. Called on creation and before a rebuild."""

    @classmethod
    def types(cls) -> frozenset[str]:
        """The event types this projection handles."""
        return frozenset(cls._handlers)

    def apply(self, record: Recorded) -> None:
        """Fold one event into the state."""
        handler = self._handlers.get(record.type)
        if handler is not None:
            handler(self, record)
        self.position = record.position

    def snapshot(self) -> Any:
        """The state as JSON-ready data, or None if this projection takes no snapshots."""
        return None

    def restore(self, state: Any) -> None:
        """Load the state saved by :meth:`snapshot` (override it with ``snapshot``)."""
        raise XcoreError(f"projection {self.name!r} saved a snapshot but does not define restore()")


async def fold(
    store: EventStore,
    projection: Projection,
    *,
    until: int | None = None,
    batch_size: int = 20_000,
    on_batch: Callable[[int], Any] | None = None,
) -> int:
    """Apply every event after ``projection.position`` (up to ``until``); return the count.

    The log's last position is taken *before* each read: when a read comes back short,
    every event up to that bound has been seen (later appends are not skipped, as they
    would be with a bound taken after the read). The next batch is read while the
    current one is applied, so the store's thread and the fold overlap where the
    interpreter lets them.

    A store that offers ``read_lean_rows`` (SQLite) hands back rows, not records: each
    record is built, handed to its handler and dropped before the next is built
    (:class:`~kernel.events.LeanRows`).
    """
    if type(batch_size) is not int or batch_size < 1:
        raise XcoreError(
            f"a fold's batch_size must be a whole number of 1 or more, not {batch_size!r}"
        )
    if until is not None and type(until) is not int:
        # a float reads as the number it is, but the projection's position stays whole
        # (2.5 became its position); NaN folded past every bound, text compared as SQLite
        # orders it (after every number)
        if type(until) is not float or not math.isfinite(until):
            raise StoreError(f"a fold's until must be a position (a number), not {until!r}")
        until = math.floor(until)
    types = projection.types()
    fast = type(projection).apply is Projection.apply
    handlers = projection._handlers

    # a store may offer a leaner read for folds (SQLite: rows of the three columns a
    # fold needs; the records fetch the others only when asked)
    read_rows = getattr(store, "read_lean_rows", None)
    read = store.read

    async def bounded_read(after: int) -> tuple[int, LeanRows | list[Recorded]]:
        bound = await store.last_position()
        if read_rows is not None:
            got = await read_rows(after=after, types=types, limit=batch_size, until=until)
            return bound, got
        return bound, await read(after=after, types=types, limit=batch_size)

    count = 0
    pending = asyncio.ensure_future(bounded_read(projection.position))
    _pause_gc()
    try:
        while True:
            bound, got = await pending
            size = len(got)
            full = size == batch_size
            if isinstance(got, LeanRows):
                last = got.last if size else projection.position
            else:
                last = got[-1].position if size else projection.position
            if full and (until is None or last < until):
                pending = asyncio.ensure_future(bounded_read(last))
            else:
                full = False
            try:
                if fast and isinstance(got, LeanRows):
                    _apply_rows(got, handlers, projection)  # read up to ``until`` already
                    applied = size
                else:
                    batch = got.records() if isinstance(got, LeanRows) else got
                    if until is not None and batch and batch[-1].position > until:
                        batch = [r for r in batch if r.position <= until]
                    if fast:
                        _apply_records(batch, handlers, projection)
                    else:
                        for record in batch:
                            projection.apply(record)
                    applied = len(batch)
            finally:
                if isinstance(got, LeanRows) and got.batch is not None:
                    # records the projection kept load their own row from now on, and
                    # keep no other row of the batch alive (see LeanBatch)
                    got.batch.release()
            count += applied
            if on_batch is not None:
                await on_batch(applied)
            if not full:
                # nothing else of its types up to the bound taken before this read
                target = bound if until is None else min(until, bound)
                projection.position = max(projection.position, target)
                return count
    finally:
        _resume_gc()
        if not pending.done():
            pending.cancel()


def _apply_records(
    batch: list[Recorded], handlers: dict[str, HandlerFn], projection: Projection
) -> None:
    """Hand each record to its handler; the projection's position is the last record
    applied, also when a handler raises (a fold run again applies no record twice)."""
    get = handlers.get
    record = None
    try:
        for record in batch:
            handler = get(record.type)
            if handler is not None:
                handler(projection, record)
    except BaseException:
        done = batch.index(record)  # type: ignore[arg-type]
        if done:
            projection.position = batch[done - 1].position
        raise
    if batch:
        projection.position = batch[-1].position


def _apply_rows(got: LeanRows, handlers: dict[str, HandlerFn], projection: Projection) -> None:
    """As :func:`_apply_records`, each record built from its row just before its handler
    runs (the fields :meth:`LeanRecorded.from_lean_rows` sets), and dropped after (its
    memory reused by the next). The hot loop of a replay: no call per event but the
    record's bare constructor, the decoding and the handler; the handler and whether
    the type needs upcasting are looked up again only when the type changes from the
    previous row's (a string comparison instead of two hash lookups of a fresh string).
    """
    rows = got.rows
    if not rows:
        return
    lean = LeanRecorded
    loads = orjson.loads
    versioned = registry.versioned
    get = handlers.get
    batch = got.batch
    position = None
    last_type = None
    handler = None
    upcast = False
    try:
        if got.with_schema:
            set_schema = Recorded.__dict__["schema"].__set__
            for position, type_name, schema, data in rows:
                if type_name != last_type:
                    handler = get(type_name)
                    upcast = type_name in versioned
                    last_type = type_name
                if handler is None:
                    continue
                r = lean()
                r.position = position
                r.type = type_name
                set_schema(r, schema)
                r.data = got.upcast(type_name, position, schema, data) if upcast else loads(data)
                r._batch = batch
                handler(projection, r)
        else:
            for position, type_name, data in rows:
                if type_name != last_type:
                    handler = get(type_name)
                    upcast = type_name in versioned
                    last_type = type_name
                if handler is None:
                    continue
                r = lean()
                r.position = position
                r.type = type_name
                r.data = got.upcast(type_name, position, None, data) if upcast else loads(data)
                r._batch = batch
                handler(projection, r)
    except BaseException:
        if position is not None:  # else nothing was applied
            done = bisect.bisect_left(rows, position, key=_position)
            if done:
                projection.position = rows[done - 1][0]
        raise
    projection.position = rows[-1][0]


def _position(row: Any) -> Any:
    return row[0]


#: Folds running now that paused the cyclic garbage collector.
_gc_pauses = 0
_gc_was_enabled = False


def _pause_gc() -> None:
    """Pause the cyclic GC while a fold runs (nested folds share one pause).

    A fold allocates millions of short-lived, acyclic objects (records, their data): the
    collector finds nothing to free in them, yet its generation-0 passes cost about a
    third of a fold's time. Reference counting still frees every record at once; only
    cycles made elsewhere meanwhile wait for the fold's end.
    """
    global _gc_pauses, _gc_was_enabled
    if _gc_pauses == 0:
        _gc_was_enabled = gc.isenabled()
        gc.disable()
    _gc_pauses += 1


def folding() -> bool:
    """A fold has paused the cyclic GC right now (kernel/collector.py leaves it so)."""
    return _gc_pauses > 0


def _resume_gc() -> None:
    global _gc_pauses
    _gc_pauses -= 1
    if _gc_pauses == 0 and _gc_was_enabled:
        gc.enable()


async def state_at(store: EventStore, cls: type[P], position: int) -> P:
    """A fresh ``cls`` projection folded up to and including ``position``."""
    projection = cls()
    snap = await store.load_snapshot(cls.name)
    if snap is not None and snap.schema == cls.schema and snap.position <= position:
        projection.restore(orjson.loads(snap.state))
        projection.position = snap.position
    await fold(store, projection, until=position)
    return projection


class Projector:
    """Keeps one projection up to date: snapshot or zero, catch-up, then live."""

    def __init__(
        self,
        store: EventStore,
        projection: Projection,
        *,
        dead_letter: DeadLetter | None = None,
    ) -> None:
        self.store = store
        self.projection = projection
        self._dead_letter = dead_letter
        self._subscription: Subscription | None = None
        self._since_snapshot = 0

    async def start(self) -> None:
        """Catch up (from the saved snapshot if it is still valid), then follow live."""
        p = self.projection
        snap = await self.store.load_snapshot(p.name)
        if snap is not None and snap.schema == p.schema and p.position == 0:
            try:
                p.restore(orjson.loads(snap.state))
                p.position = snap.position
            except Exception:
                log.exception("snapshot of projection %r is unusable; rebuilding", p.name)
                p.reset()
                p.position = 0
        await self._follow()

    async def _follow(self) -> None:
        p = self.projection
        await fold(self.store, p, on_batch=self._count_and_snapshot)
        self._subscription = Subscription(
            self.store,
            self._apply,
            name=f"projection:{p.name}",
            start=p.position,
            types=p.types(),
            dead_letter=self._dead_letter,
        )
        # The projection's position is its checkpoint (held in its snapshot), so the
        # subscription itself saves none.
        self._subscription._named = False
        await self._subscription.start()

    async def _apply(self, record: Recorded) -> None:
        # Applying and saving a snapshot are separate steps: a save that fails is
        # logged and tried again later, never a reason to apply the event twice.
        self.projection.apply(record)
        self._since_snapshot += 1
        await self._maybe_snapshot()

    async def _count_and_snapshot(self, handled: int) -> None:
        self._since_snapshot += handled
        await self._maybe_snapshot()

    async def _maybe_snapshot(self) -> None:
        p = self.projection
        if not p.snapshot_every or self._since_snapshot < p.snapshot_every:
            return
        try:
            await self.save_snapshot()
        except Exception:
            log.exception(
                "could not save the snapshot of projection %r at position %s; "
                "the projection goes on and tries again after %s more events",
                p.name,
                p.position,
                p.snapshot_every,
            )
            self._since_snapshot = 0

    async def save_snapshot(self) -> None:
        p = self.projection
        state = p.snapshot()
        if state is None:
            return
        await self.store.save_snapshot(
            Snapshot(name=p.name, position=p.position, schema=p.schema, state=orjson.dumps(state))
        )
        self._since_snapshot = 0

    async def wait_for(self, position: int, timeout: float | None = 10.0) -> None:
        """Wait until the projection has folded everything up to ``position``."""
        if self._subscription is None:
            raise RuntimeError(f"projection {self.projection.name!r} is not started")
        await self._subscription.wait_for(position, timeout)
        self.projection.position = max(self.projection.position, self._subscription.position)

    async def rebuild(self) -> None:
        """Throw the state away and fold the whole log again."""
        await self.stop(save=False)
        self.projection.reset()
        self.projection.position = 0
        self._since_snapshot = 0
        await self._follow()

    async def stop(self, save: bool = True) -> None:
        if self._subscription is not None:
            await self._subscription.stop()
            self._subscription = None
        if save:
            try:
                await self.save_snapshot()
            except Exception:
                log.exception("could not save the snapshot of projection %r", self.projection.name)
