"""Events: the frozen models services define, their registry, and the recorded envelope.

A service declares its events as subclasses of :class:`Event`; each class registers
itself under its type name (the class name unless ``type_name`` is given). When an
event's fields change incompatibly, bump ``schema`` and register an upcaster that lifts
the stored data of the older schema; readers always see the newest shape.

Reading never fails on a type this process does not know (an event written by a newer
version, or by a plugin that is not loaded): :class:`Recorded` keeps its raw data and
:attr:`Recorded.event` is ``None``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Final

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from kernel.errors import EventError, EventTypeConflict, UnknownEventType

__all__ = [
    "Event",
    "EventRegistry",
    "KernelStarted",
    "KernelStopped",
    "LeanRecorded",
    "LeanRows",
    "LoadedRecorded",
    "Meta",
    "NewEvent",
    "Recorded",
    "SubscriberFailed",
    "new_id",
    "registry",
    "upcaster",
]

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


#: UUIDv7's version (7) and variant (0b10) bits, all within the low 80 bits of the id.
_V7_CLEAR = ~((0xF << 76) | (0x3 << 62))
_V7_SET = (0x7 << 76) | (0x2 << 62)


class _RandomPool:
    """The random low 80 bits of ids (version and variant bits set), drawn from the OS
    in blocks and handed out one at a time.

    One ``os.urandom`` call per 1,024 ids instead of one per id (a system call costs
    about a microsecond, most of an id's price), and the bytes turned into integers for
    the whole block at once: an id then costs one ``list.pop``. A forked child starts
    with an empty pool, so parent and child never hand out the same bits.
    """

    BLOCK = 1024

    def __init__(self) -> None:
        #: the values not handed out yet (the same list for the pool's life)
        self.values: list[int] = []
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self.values.clear)

    def refill(self) -> int:
        """Draw a new block; returns one value of it."""
        buf = os.urandom(10 * self.BLOCK)
        take = int.from_bytes
        self.values.extend(
            [take(buf[i : i + 10], "big") & _V7_CLEAR | _V7_SET for i in range(0, len(buf), 10)]
        )
        return self.values.pop()


_pool = _RandomPool()
_next_random = _pool.values.pop
_time_ns = time.time_ns


def new_id() -> str:
    """A fresh event id: a UUIDv7 (time-ordered) as 32 hex digits.

    Time-ordered ids land at the end of the log's id index instead of at random places,
    which makes a commit write a few index pages rather than one per event. The 74
    random bits come from a pool of OS randomness (see :class:`_RandomPool`).
    """
    try:
        low = _next_random()
    except IndexError:
        low = _pool.refill()
    # to_bytes().hex(): 32 lowercase digits as the format "032x", in half the time
    return ((_time_ns() // 1_000_000 & 0xFFFF_FFFF_FFFF) << 80 | low).to_bytes(16, "big").hex()


class Event(BaseModel):
    """Base class of every event: a frozen, validated value object.

    Subclasses register themselves; set ``type_name`` to decouple the stored name from
    the class name, and ``schema`` (default 1) when the stored shape changes.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    type_name: ClassVar[str] = ""
    schema_version: ClassVar[int] = 1

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if "type_name" not in cls.__dict__ or not cls.__dict__["type_name"]:
            cls.type_name = cls.__name__
        registry.register(cls)


#: The schema numbers every store can hold (PostgreSQL keeps them as INTEGER).
MAX_SCHEMA: Final = 2**31 - 1


def check_schema(schema: object, owner: str) -> None:
    """Refuse a schema number no store can keep, naming ``owner``, before anything is
    written (PostgreSQL's driver only said "invalid input for query argument $11")."""
    if type(schema) is not int or not 1 <= schema <= MAX_SCHEMA:
        raise EventError(
            f"{owner}: schema must be a whole number from 1 to {MAX_SCHEMA}, got {schema!r}"
        )


class EventRegistry:
    """Maps type names to event classes and holds the upcasters between schemas."""

    def __init__(self) -> None:
        self._types: dict[str, type[Event]] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}
        #: type names whose class is past schema 1 (only these can need upcasting)
        self.versioned: set[str] = set()

    def register(self, cls: type[Event]) -> None:
        name = cls.type_name
        check_schema(cls.schema_version, f"event class {cls.__module__}.{cls.__qualname__}")
        known = self._types.get(name)
        if known is not None and known is not cls:
            # A hot-reloaded module defines the same class again: replace it.
            same_origin = (known.__module__, known.__qualname__) == (
                cls.__module__,
                cls.__qualname__,
            )
            if not same_origin:
                raise EventTypeConflict(
                    f"event type {name!r} is already registered by "
                    f"{known.__module__}.{known.__qualname__}; "
                    f"{cls.__module__}.{cls.__qualname__} cannot claim it too"
                )
        self._types[name] = cls
        if cls.schema_version > 1:
            self.versioned.add(name)
        else:
            self.versioned.discard(name)

    def add_upcaster(self, type_name: str, from_schema: int, fn: Upcaster) -> None:
        key = (type_name, from_schema)
        if key in self._upcasters:
            raise EventTypeConflict(
                f"an upcaster for {type_name!r} from schema {from_schema} already exists"
            )
        self._upcasters[key] = fn

    def get(self, type_name: str) -> type[Event] | None:
        return self._types.get(type_name)

    def require(self, type_name: str) -> type[Event]:
        cls = self._types.get(type_name)
        if cls is None:
            raise UnknownEventType(f"no event type is registered as {type_name!r}")
        return cls

    def names(self) -> list[str]:
        return sorted(self._types)

    def upcast(self, type_name: str, schema: int, data: dict[str, Any]) -> dict[str, Any]:
        """Lift ``data`` stored at ``schema`` to the registered class's schema."""
        cls = self._types.get(type_name)
        if cls is None or schema >= cls.schema_version:
            return data
        while schema < cls.schema_version:
            fn = self._upcasters.get((type_name, schema))
            if fn is None:
                raise EventError(
                    f"event type {type_name!r}: no upcaster from schema {schema} "
                    f"to {schema + 1} (the class is at schema {cls.schema_version})"
                )
            data = fn(data)
            schema += 1
        return data


#: The process-wide registry every :class:`Event` subclass joins.
registry = EventRegistry()


def upcaster(type_name: str, from_schema: int) -> Callable[[Upcaster], Upcaster]:
    """Register ``fn`` to lift ``type_name`` data from ``from_schema`` to the next."""

    def decorate(fn: Upcaster) -> Upcaster:
        registry.add_upcaster(type_name, from_schema, fn)
        return fn

    return decorate


def compact_json(value: Any) -> bytes:
    """``orjson.dumps(value)`` in a bytes object of its own size.

    orjson returns its output in a buffer of at least 4 KiB that it never shrinks: each
    result kept (a stored row in the kernel's tail of recent events, 8,192 of them) held
    4 KiB for a ~100-byte value, which made a server's memory grow by ~24 KiB per plugin
    reload until the tail was full (32 MiB). The copy costs far less than the write.
    """
    return bytes(memoryview(orjson.dumps(value)))


#: ``Meta()``'s default id: a fresh one (an explicit ``id=None`` stays None, as before).
_FRESH_ID: Any = object()


@dataclass(frozen=True, slots=True, init=False)
class Meta:
    """Metadata of a recorded event.

    ``id`` is the idempotency key: appending an event whose id is already in the log
    stores nothing new (a new id when none is given). ``correlation_id`` ties a request
    to its outcomes; ``causation_id`` is the id of the event that caused this one.
    """

    id: str = field(default_factory=new_id)
    correlation_id: str | None = None
    causation_id: str | None = None
    actor: str | None = None
    node: str | None = None
    boot: str | None = None

    def __init__(
        self,
        id: str = _FRESH_ID,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        actor: str | None = None,
        node: str | None = None,
        boot: str | None = None,
    ) -> None:
        # Frozen: the generated __init__ would call object.__setattr__ per field; the
        # slots' own setters cost a fifth of that, and one Meta is built per event.
        _set_meta_id(self, new_id() if id is _FRESH_ID else id)
        _set_meta_correlation_id(self, correlation_id)
        _set_meta_causation_id(self, causation_id)
        _set_meta_actor(self, actor)
        _set_meta_node(self, node)
        _set_meta_boot(self, boot)

    def to_json(self) -> bytes:
        """The stored form: the fields that are set (``from_json`` reads a missing one as
        None; most events carry an id alone, and shorter rows are fewer pages to write)."""
        if (
            self.correlation_id is None
            and self.causation_id is None
            and self.actor is None
            and self.node is None
            and self.boot is None
        ):
            eid = self.id
            if type(eid) is str and eid.isascii() and eid.isalnum():
                # nothing to escape (a fresh id is hex): what orjson writes, built directly
                return b'{"id":"' + eid.encode() + b'"}'
            return compact_json({"id": eid})
        return compact_json(
            {
                key: value
                for key, value in (
                    ("id", self.id),
                    ("correlation_id", self.correlation_id),
                    ("causation_id", self.causation_id),
                    ("actor", self.actor),
                    ("node", self.node),
                    ("boot", self.boot),
                )
                if value is not None
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> Meta:
        d = orjson.loads(raw)
        return cls(
            id=d["id"],
            correlation_id=d.get("correlation_id"),
            causation_id=d.get("causation_id"),
            actor=d.get("actor"),
            node=d.get("node"),
            boot=d.get("boot"),
        )


_set_meta_id = Meta.__dict__["id"].__set__
_set_meta_correlation_id = Meta.__dict__["correlation_id"].__set__
_set_meta_causation_id = Meta.__dict__["causation_id"].__set__
_set_meta_actor = Meta.__dict__["actor"].__set__
_set_meta_node = Meta.__dict__["node"].__set__
_set_meta_boot = Meta.__dict__["boot"].__set__


@dataclass(frozen=True, slots=True, init=False)
class NewEvent:
    """An event ready to append: type, schema, serialized data and metadata."""

    type: str
    data: bytes
    meta: Meta
    schema: int = 1
    #: True when the caller chose ``meta.id``: only then can it already be in the log.
    explicit_id: bool = False

    def __init__(
        self, type: str, data: bytes, meta: Meta, schema: int = 1, explicit_id: bool = False
    ) -> None:
        # as Meta.__init__: the slots' setters, not object.__setattr__ (one per event)
        _set_new_type(self, type)
        _set_new_data(self, data)
        _set_new_meta(self, meta)
        _set_new_schema(self, schema)
        _set_new_explicit_id(self, explicit_id)

    @classmethod
    def of(
        cls, event: Event, meta: Meta | None = None, *, explicit_id: bool | None = None
    ) -> NewEvent:
        """``event`` ready to append; ``explicit_id`` defaults to "``meta`` was given"."""
        return cls(
            type=event.type_name,
            data=event.__pydantic_serializer__.to_json(event),
            meta=meta if meta is not None else Meta(),
            schema=event.schema_version,
            explicit_id=meta is not None if explicit_id is None else explicit_id,
        )

    @classmethod
    def raw(
        cls, type_name: str, data: Mapping[str, Any], meta: Meta | None = None, schema: int = 1
    ) -> NewEvent:
        """An event given as a type name and plain data (no class needed)."""
        if schema != 1:
            check_schema(schema, f"event type {type_name!r}")
        return cls(
            type=type_name,
            data=compact_json(dict(data)),
            meta=meta if meta is not None else Meta(),
            schema=schema,
            explicit_id=meta is not None,
        )


_set_new_type = NewEvent.__dict__["type"].__set__
_set_new_data = NewEvent.__dict__["data"].__set__
_set_new_meta = NewEvent.__dict__["meta"].__set__
_set_new_schema = NewEvent.__dict__["schema"].__set__
_set_new_explicit_id = NewEvent.__dict__["explicit_id"].__set__


class Recorded:
    """An event as stored in the log: its position, stream, version, data and metadata.

    ``data`` is the decoded (and upcast) payload as a dict; :attr:`event` builds the
    typed model on demand and is ``None`` for a type this process does not know.
    Metadata is decoded lazily: folding a projection rarely needs it.
    """

    __slots__ = (
        "_event",
        "_meta",
        "_meta_raw",
        "data",
        "position",
        "schema",
        "stream",
        "timestamp",
        "type",
        "version",
    )

    def __init__(
        self,
        position: int,
        stream: str,
        version: int,
        type: str,
        schema: int,
        data: dict[str, Any],
        meta: Meta | bytes | str,
        timestamp: float,
    ) -> None:
        self.position = position
        self.stream = stream
        self.version = version
        self.type = type
        self.schema = schema
        self.data = data
        if isinstance(meta, Meta):
            self._meta: Meta | None = meta
            self._meta_raw: bytes | str | None = None
        else:
            self._meta = None
            self._meta_raw = meta
        self.timestamp = timestamp
        self._event: Event | None = None

    @classmethod
    def from_row(
        cls,
        position: int,
        stream: str,
        version: int,
        type_name: str,
        schema: int,
        data: bytes | str,
        meta: bytes | str,
        timestamp: float,
    ) -> Recorded:
        decoded = orjson.loads(data)
        if type_name in registry.versioned:
            decoded = registry.upcast(type_name, schema, decoded)
        return cls(position, stream, version, type_name, schema, decoded, meta, timestamp)

    @classmethod
    def of(
        cls, position: int, stream: str, version: int, new: NewEvent, timestamp: float
    ) -> Recorded:
        """The record of ``new`` as just appended (data decoded and upcast)."""
        data = orjson.loads(new.data)
        if new.type in registry.versioned:
            data = registry.upcast(new.type, new.schema, data)
        return cls(position, stream, version, new.type, new.schema, data, new.meta, timestamp)

    @staticmethod
    def from_rows(rows: Iterable[Sequence[Any]]) -> list[Recorded]:
        """Records from store rows ``(position, stream, version, type, schema, data, meta,
        timestamp)`` — the hot path of replay, kept free of per-row calls."""
        new = Recorded.__new__
        loads = orjson.loads
        versioned = registry.versioned
        out: list[Recorded] = []
        append = out.append
        for position, stream, version, type_name, schema, data, meta, timestamp in rows:
            r = new(Recorded)
            r.position = position
            r.stream = stream
            r.version = version
            r.type = type_name
            r.schema = schema
            if type_name in versioned:
                r.data = registry.upcast(type_name, schema, loads(data))
            else:
                r.data = loads(data)
            r._meta = None
            r._meta_raw = meta
            r.timestamp = timestamp
            r._event = None
            append(r)
        return out

    @property
    def meta(self) -> Meta:
        if self._meta is None:
            assert self._meta_raw is not None
            self._meta = Meta.from_json(self._meta_raw)
            self._meta_raw = None
        return self._meta

    @property
    def id(self) -> str:
        return self.meta.id

    @property
    def recorded_at(self) -> datetime:
        return datetime.fromtimestamp(self.timestamp, UTC)

    @property
    def known(self) -> bool:
        """Whether this process has a class registered for this event's type."""
        return registry.get(self.type) is not None

    @property
    def event(self) -> Event | None:
        """The typed event, or ``None`` when the type is unknown here or does not validate."""
        if self._event is None:
            cls = registry.get(self.type)
            if cls is None:
                return None
            try:
                self._event = cls.model_validate(self.data)
            except ValidationError:
                return None
        return self._event

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view of the whole envelope (used by exports and the admin API)."""
        m = self.meta
        return {
            "position": self.position,
            "stream": self.stream,
            "version": self.version,
            "type": self.type,
            "schema": self.schema,
            "data": self.data,
            "meta": {
                "id": m.id,
                "correlation_id": m.correlation_id,
                "causation_id": m.causation_id,
                "actor": m.actor,
                "node": m.node,
                "boot": m.boot,
            },
            "recorded_at": self.recorded_at.isoformat(),
        }

    def __repr__(self) -> str:
        return (
            f"Recorded(position={self.position}, stream={self.stream!r}, "
            f"version={self.version}, type={self.type!r})"
        )


class LeanRecorded(Recorded):
    """A record of a replay batch built from ``(position, type, data)`` alone (with
    ``schema`` too when the batch may hold a type that needs upcasting).

    Guarantee: it reads exactly as the :class:`Recorded` of the same row. Mechanism: a
    fold mostly needs the type and data; the other columns (stream, version, schema,
    metadata, time) of the whole batch are fetched once, on the first access to any of
    them by any record of the batch, through the ``load`` callable the store gives: it
    maps a range of positions to ``(position, stream, version, meta, recorded_at,
    schema)`` rows of the same, immutable, log. The batch holds those rows, never the
    records: a record a projection keeps keeps no other record alive. The decoded
    metadata and the typed event are left unset until asked for (one slot write less
    each per record).

    The columns not read are properties (no ``__getattr__``: it would make every
    attribute read of the record, ``r.data`` included, take the interpreter's slow
    path); once they are loaded the record becomes a :class:`LoadedRecorded`, whose
    columns are the plain slots of :class:`Recorded` again. A lean record is built bare,
    ``LeanRecorded()`` (no ``__init__`` to run), its reader setting ``position``,
    ``type``, ``data``, maybe ``schema``, and ``_batch``.
    """

    __slots__ = ("_batch",)

    _batch: LeanBatch | None

    __init__ = object.__init__

    def _load(self) -> None:
        """Set the columns this record lacks, from its batch (loaded once for all)."""
        batch = self._batch
        if batch is None:
            raise AttributeError(f"{type(self).__name__!r} object has no batch to load from")
        _, stream, version, meta_raw, timestamp, schema = batch.row(self.position)
        _set_stream(self, stream)
        _set_version(self, version)
        _set_meta_raw(self, meta_raw)
        _set_timestamp(self, timestamp)
        _set_schema(self, schema)
        for get, put in ((_get_meta, _set_meta), (_get_event, _set_event)):
            try:
                get(self)
            except AttributeError:
                put(self, None)
        self._batch = None
        self.__class__ = LoadedRecorded

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled and copied as the :class:`Recorded` it reads as (its batch, which holds
        the store's loader, is no part of its value)."""
        meta = self._meta if self._meta is not None else self._meta_raw
        columns = (self.position, self.stream, self.version, self.type, self.schema)
        return (Recorded, (*columns, self.data, meta, self.timestamp))

    @staticmethod
    def from_lean_rows(
        rows: Sequence[Sequence[Any]],
        load: Callable[[int, int], Iterable[Sequence[Any]]],
    ) -> list[Recorded]:
        """Records from ``(position, type, data)`` or ``(position, type, schema, data)``
        rows in position order; ``load(first, last)`` gives the missing columns of the
        positions between them. Rows without their schema may still hold a type that
        needs upcasting (one registered since the read began): its schema is then taken
        from the batch's loaded columns."""
        return LeanRows(rows, load).records()


class LoadedRecorded(LeanRecorded):
    """A :class:`LeanRecorded` whose columns are loaded: they are plain slots again."""

    __slots__ = ()


def _slot(name: str) -> Any:
    return Recorded.__dict__[name]


def _loaded_column(name: str) -> property:
    """A column a lean record loads with its batch's on first access."""
    get, put = _slot(name).__get__, _slot(name).__set__

    def read(self: LeanRecorded) -> Any:
        try:
            return get(self)
        except AttributeError:
            pass
        self._load()
        return get(self)

    return property(read, put)


def _unset_is_none(name: str) -> property:
    """A slot read as None while unset (the decoded metadata, the typed event)."""
    get, put = _slot(name).__get__, _slot(name).__set__

    def read(self: LeanRecorded) -> Any:
        try:
            return get(self)
        except AttributeError:
            return None

    return property(read, put)


_set_stream = _slot("stream").__set__
_set_version = _slot("version").__set__
_set_meta_raw = _slot("_meta_raw").__set__
_set_timestamp = _slot("timestamp").__set__
_set_schema = _slot("schema").__set__
_get_meta, _set_meta = _slot("_meta").__get__, _slot("_meta").__set__
_get_event, _set_event = _slot("_event").__get__, _slot("_event").__set__

for _name in ("stream", "version", "_meta_raw", "timestamp", "schema"):
    setattr(LeanRecorded, _name, _loaded_column(_name))
    setattr(LoadedRecorded, _name, _slot(_name))
for _name in ("_meta", "_event"):
    setattr(LeanRecorded, _name, _unset_is_none(_name))
    setattr(LoadedRecorded, _name, _slot(_name))


def _lean_records(rows: Sequence[Sequence[Any]], batch: LeanBatch) -> list[Recorded]:
    """The records of lean ``rows`` (see :meth:`LeanRecorded.from_lean_rows`)."""
    lean = LeanRecorded
    set_schema = _set_schema
    loads = orjson.loads
    versioned = registry.versioned
    out: list[Recorded] = []
    append = out.append
    if len(rows[0]) == 3:
        for position, type_name, data in rows:
            r = lean()
            r.position = position
            r.type = type_name
            if type_name in versioned:
                schema = batch.row(position)[5]
                r.data = registry.upcast(type_name, schema, loads(data))
            else:
                r.data = loads(data)
            r._batch = batch
            append(r)
        return out
    for position, type_name, schema, data in rows:
        r = lean()
        r.position = position
        r.type = type_name
        set_schema(r, schema)
        if type_name in versioned:
            r.data = registry.upcast(type_name, schema, loads(data))
        else:
            r.data = loads(data)
        r._batch = batch
        append(r)
    return out


class LeanRows:
    """The rows of one lean read, not yet made records: what a fold turns into
    :class:`LeanRecorded` one at a time, each handed to its handler at once.

    Guarantee: :meth:`records` gives exactly what :meth:`LeanRecorded.from_lean_rows`
    gives for the same rows, and a fold that builds its records inline from ``rows``
    (``kernel.projections.fold``) hands its handlers the same records. Mechanism: a
    record built and folded straight away is freed before the next is built (its
    memory reused, still in the CPU's cache), instead of a list of a batch's records
    built first and walked after (~0.5 us less per event).

    ``rows`` are ``(position, type, data)`` or, when ``with_schema``, ``(position,
    type, schema, data)`` in position order; ``batch`` loads the other columns.
    """

    __slots__ = ("batch", "rows", "with_schema")

    def __init__(
        self, rows: Sequence[Sequence[Any]], load: Callable[[int, int], Iterable[Sequence[Any]]]
    ) -> None:
        self.rows = rows
        self.with_schema = bool(rows) and len(rows[0]) == 4
        self.batch = LeanBatch(load, rows[0][0], rows[-1][0]) if rows else None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def last(self) -> int:
        """The position of the last row (the batch is not empty)."""
        return int(self.rows[-1][0])

    def records(self) -> list[Recorded]:
        """The records of every row, as a list."""
        if self.batch is None:
            return []
        return _lean_records(self.rows, self.batch)

    def upcast(self, type_name: str, position: int, schema: int | None, data: bytes) -> Any:
        """The data of a row whose type needs upcasting (its schema loaded if absent)."""
        if schema is None:
            assert self.batch is not None
            schema = self.batch.row(position)[5]
        return registry.upcast(type_name, schema, orjson.loads(data))


class LeanBatch:
    """Where the records of one lean read find the columns they lack.

    While its fold is on it, the batch's columns are loaded once for all its records
    (one query). Once the fold is past it (:meth:`release`), a record still asking loads
    its own row alone and nothing is kept: a record a projection kept would otherwise
    keep every row of its batch's columns (20,000 by default) alive as long as itself.
    """

    __slots__ = ("_load", "_rows", "first", "last", "released")

    def __init__(
        self, load: Callable[[int, int], Iterable[Sequence[Any]]], first: int, last: int
    ) -> None:
        self._load = load
        self.first = first
        self.last = last
        self._rows: dict[int, Sequence[Any]] | None = None
        #: the fold is past this batch: no more loads of the whole of it
        self.released = False

    def release(self) -> None:
        """Drop the loaded columns; later loads read one row each (see the class)."""
        self.released = True
        self._rows = None

    def row(self, position: int) -> Sequence[Any]:
        """``(position, stream, version, meta, recorded_at, schema)`` of ``position``."""
        rows = self._rows
        if rows is None:
            if self.released:
                for got in self._load(position, position):
                    if got[0] == position:
                        return got
                rows = {}
            else:
                rows = self._rows = {r[0]: r for r in self._load(self.first, self.last)}
        row = rows.get(position)
        if row is None:
            raise EventError(f"the log no longer holds position {position} of a batch read from it")
        return row


# -- the kernel's own events ------------------------------------------------------------


class KernelStarted(Event):
    """A kernel process opened the log and started its services."""

    node: str
    boot: str
    version: str
    pid: int


class KernelStopped(Event):
    """A kernel process stopped cleanly (a crash leaves no such event)."""

    node: str
    boot: str


class SubscriberFailed(Event):
    """A subscriber kept failing on an event and gave up on it (a dead letter)."""

    subscriber: str
    position: int
    event_type: str
    event_id: str
    error: str
    traceback: str
    attempts: int
