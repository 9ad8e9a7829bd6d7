"""Triggers: when a task falls due. Times are UTC epoch seconds.

A trigger answers two questions: the first due time when a task is registered
(:meth:`Trigger.first`) and the next due time strictly after a given one
(:meth:`Trigger.next_after`). :func:`catch_up` counts the due times a stopped process
missed; cron triggers count them arithmetically (:meth:`CronTrigger.count_between`).

Daylight-saving time, the rule for each trigger:

- **cron** follows Vixie cron. For a *fixed-time* expression (neither the minute nor
  the hour field starts with ``*``): a local time that falls in a skipped hour runs
  once, right at the end of the gap (several such times, and a match exactly at the
  gap's end, make one run); a local time in a repeated hour runs once, on its first
  pass. For a *wildcard* expression (``*/5 * * * *``, ``0 * * * *``) nothing is
  shifted: times in the gap do not exist, and the repeated hour runs on both passes.
  The seconds field plays no part in the choice. croniter alone runs fixed-time
  entries twice in a repeated hour; this module does not use it.
- **calendar** (``every N days/weeks/months/years at HH:MM``): like a fixed-time cron
  entry — a time in a gap runs at the gap's end, a repeated time on its first pass.
- **interval** (``every=``) and **date** (``at=``, ``after=``) are instants: DST does
  not move them.
- **any** / **all** combine the instants of their parts (each part keeps its own rule).

The cron step is transition-aware: the zone's offset transitions are computed once per
zone and year (:func:`transitions`), the next wall-clock match is found field by field
and mapped to an instant with the offset in force, and only a transition that falls
before that instant changes the answer — no scan minute by minute around a change.
"""

from __future__ import annotations

import calendar
import contextlib
import functools
import math
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from services.scheduler.cron import CronSpec, parse_cron

__all__ = [
    "AfterTrigger",
    "AllOf",
    "AnyOf",
    "Bounded",
    "CalendarTrigger",
    "CronTrigger",
    "DateTrigger",
    "IntervalTrigger",
    "Trigger",
    "catch_up",
    "on_grid",
    "parse_duration",
    "parse_trigger",
    "parse_zone",
    "transitions",
]

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_EPOCH = datetime(1970, 1, 1)
_TINY = timedelta(microseconds=1)
#: The longest duration accepted (an interval, a delay, a timeout): 100 years. Longer
#: ones would put due times past what a datetime can show (the admin table, the log).
MAX_DURATION = 100 * 365.25 * 86400
#: Instants (``at=``, ``start``, ``end``) are accepted from 1900 to 9000: the due times
#: computed from them (cron looks up to 30 years ahead) stay within datetime's range.
MIN_INSTANT = datetime(1900, 1, 1, tzinfo=UTC).timestamp()
MAX_INSTANT = datetime(9000, 1, 1, tzinfo=UTC).timestamp()


def parse_duration(value: str | float | int, what: str = "duration") -> float:
    """Seconds from ``30``, ``2.5``, ``"30s"``, ``"10m"``, ``"1h30m"``, ``"250ms"``."""
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected seconds or a string like '30s', got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().replace(" ", "")
        try:
            seconds = float(text)
        except ValueError:
            pos, seconds = 0, 0.0
            for match in _PART.finditer(text):
                if match.start() != pos:
                    break
                seconds += float(match.group(1)) * _UNITS[match.group(2)]
                pos = match.end()
            if pos != len(text) or not text:
                raise ValueError(
                    f"{what}: {value!r} is not a duration (use seconds or e.g. '30s', '10m', '1h30m')"
                ) from None
    else:
        raise ValueError(f"{what}: expected seconds or a string like '30s', got {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{what}: {value!r} must be a finite, non-negative duration")
    if seconds > MAX_DURATION:
        raise ValueError(f"{what}: {value!r} is above the maximum duration of 100 years")
    return seconds


def parse_zone(name: str) -> ZoneInfo:
    if not isinstance(name, str):
        raise ValueError(f"time zone: expected a name like 'Europe/Paris', got {name!r}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r}") from None


def parse_at(value: str | datetime, tz: str | None, what: str = "at") -> float:
    """The instant of ``at=``: an ISO 8601 string or a datetime (naive means ``tz``),
    or epoch seconds; between 1900 and 9000 (:data:`MIN_INSTANT`, :data:`MAX_INSTANT`)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _in_range(float(value), value, what)
    if isinstance(value, str):
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{what}: {value!r} is not an ISO 8601 date and time") from None
    elif isinstance(value, datetime):
        when = value
    else:
        raise ValueError(f"{what}: expected an ISO 8601 string or a datetime, got {value!r}")
    if when.tzinfo is None:
        when = when.replace(tzinfo=parse_zone(tz or "UTC"))
    try:
        instant = when.timestamp()
    except (OverflowError, ValueError):
        raise ValueError(f"{what}: {value!r} is out of range (1900 to 9000)") from None
    return _in_range(instant, value, what)


def _in_range(instant: float, value: object, what: str) -> float:
    if not math.isfinite(instant) or not MIN_INSTANT <= instant <= MAX_INSTANT:
        raise ValueError(f"{what}: {value!r} is not an instant between 1900 and 9000")
    return instant


# -- zone transitions ---------------------------------------------------------------------


def _offset(zone: ZoneInfo, t: float) -> int:
    off = datetime.fromtimestamp(t, zone).utcoffset()
    return int(off.total_seconds()) if off is not None else 0


@functools.lru_cache(maxsize=512)
def _year_transitions(zone: ZoneInfo, year: int) -> tuple[tuple[int, int, int], ...]:
    """(instant, offset before, offset after) of each change of ``zone``'s UTC offset
    in UTC year ``year``; found by 6-hour probes then bisection to the second."""
    if year < 1900 or year > 2400:
        return ()
    start = int(datetime(year, 1, 1, tzinfo=UTC).timestamp())
    end = int(datetime(year + 1, 1, 1, tzinfo=UTC).timestamp())
    found = []
    t, off = start, _offset(zone, start)
    while t < end:
        n = min(t + 21600, end)
        o2 = _offset(zone, n)
        if o2 != off:
            lo, hi = t, n
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if _offset(zone, mid) == o2:
                    hi = mid
                else:
                    lo = mid
            found.append((hi, off, o2))
            off = o2
        t = n
    return tuple(found)


def transitions(zone: ZoneInfo, after: float, years: int = 2) -> list[tuple[int, int, int]]:
    """``zone``'s offset changes strictly after ``after`` within ``years`` UTC years."""
    year = datetime.fromtimestamp(after, UTC).year
    out: list[tuple[int, int, int]] = []
    for y in range(year, year + years):
        out.extend(t for t in _year_transitions(zone, y) if t[0] > after)
    return out


def _transition_at_or_before(zone: ZoneInfo, t: float) -> tuple[int, int, int] | None:
    year = datetime.fromtimestamp(t, UTC).year
    for y in (year, year - 1):
        items = [x for x in _year_transitions(zone, y) if x[0] <= t]
        if items:
            return items[-1]
    return None


def _year_start(t: float, ahead: int) -> float:
    return datetime(datetime.fromtimestamp(t, UTC).year + ahead, 1, 1, tzinfo=UTC).timestamp()


def _wall(t: float, off: int) -> datetime:
    return _EPOCH + timedelta(seconds=t + off)


def _instant(wall: datetime, off: int) -> float:
    return (wall - _EPOCH).total_seconds() - off


# -- triggers -----------------------------------------------------------------------------


class Trigger(Protocol):
    @property
    def description(self) -> str:
        """A stable, human-readable description (also how a changed trigger is detected)."""
        ...

    @property
    def recurring(self) -> bool:
        """True when the task runs more than once."""
        ...

    def first(self, now: float) -> float | None:
        """The first due time of a task registered at ``now``."""
        ...

    def next_after(self, due: float) -> float | None:
        """The next due time strictly after ``due`` (None: never again)."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """The trigger as :func:`parse_trigger` reads it (for events and the admin API)."""
        ...


@dataclass(frozen=True)
class IntervalTrigger:
    """Every ``every`` seconds; with ``anchor``, at ``anchor + k * every``.

    ``implicit``: the anchor was not declared but put there by :func:`on_grid` (the
    shared grid of a cluster's intervals, and of those inside an ``any`` or ``all``);
    the trigger reads and describes itself as declared.
    """

    every: float
    anchor: float | None = None
    recurring: bool = True
    implicit: bool = False

    def __post_init__(self) -> None:
        if not self.every > 0:
            raise ValueError(f"every: the interval must be positive, got {self.every!r}")

    @property
    def description(self) -> str:
        if self.anchor is None or self.implicit:
            return f"every {self.every:g}s"
        return f"every {self.every:g}s from {_iso(self.anchor)}"

    def first(self, now: float) -> float:
        if self.anchor is None:
            return now + self.every
        return self.next_after(now)

    def next_after(self, due: float) -> float:
        if self.anchor is None:
            return due + self.every
        return self.at(self.index_after(due))

    def at(self, k: int) -> float:
        """The ``k``-th instant of an anchored interval: ``anchor + k * every``.

        Each instant is computed this one way, never as the one before plus ``every``:
        at epoch scale the two differ by a rounding, and a due time a rounding below its
        instant would have the instant itself, a rounding later, as its next one (two
        runs, or a period's claim key twice) instead of the one an interval later.
        """
        assert self.anchor is not None
        return self.anchor + k * self.every

    def index_after(self, due: float) -> int:
        """The index (:meth:`at`) of the first instant strictly after ``due``."""
        assert self.anchor is not None
        if due < self.anchor:
            return 0
        k = math.floor((due - self.anchor) / self.every) + 1
        # the division rounds: settle on the exact instants
        while k > 1 and self.at(k - 1) > due:
            k -= 1
        while self.at(k) <= due:
            k += 1
        return k

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"every": self.every}
        if self.anchor is not None and not self.implicit:
            out["start"] = _iso(self.anchor)
        return out


@dataclass(frozen=True)
class DateTrigger:
    """Once, at a fixed instant (``at=``)."""

    at: float
    recurring: bool = False

    @property
    def description(self) -> str:
        return f"at {_iso(self.at)}"

    def first(self, now: float) -> float:
        return self.at

    def next_after(self, due: float) -> float | None:
        return self.at if due < self.at else None

    def to_dict(self) -> dict[str, Any]:
        return {"at": _iso(self.at)}


@dataclass(frozen=True)
class AfterTrigger:
    """Once, ``delay`` seconds after the task is first registered (``after=``)."""

    delay: float
    recurring: bool = False

    @property
    def description(self) -> str:
        return f"after {self.delay:g}s"

    def first(self, now: float) -> float:
        return now + self.delay

    def next_after(self, due: float) -> None:
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"after": self.delay}


class CronTrigger:
    """A cron expression (5 fields, or 6 with seconds first, or an alias) in a zone."""

    recurring = True

    def __init__(self, expression: str, tz: str | None = None) -> None:
        self.spec: CronSpec = parse_cron(expression)
        self.expression = self.spec.expression
        self.zone_name = tz or "UTC"
        self.zone = parse_zone(self.zone_name)
        self.wildcard = self.spec.wildcard
        self.description = f"cron '{self.expression}' {self.zone_name}"

    def to_dict(self) -> dict[str, Any]:
        return {"cron": self.expression, "tz": self.zone_name}

    def first(self, now: float) -> float | None:
        return self.next_after(now)

    def next_after(self, due: float) -> float | None:
        # Fast path: ``due`` and its next match lie in the span of constant offset
        # found last time (no transition between them, no repeated hour to skip).
        span = self._span
        if span is not None and span[0] <= due < span[1]:
            c = self.spec.next_match(_wall(due, span[2]))
            if c is not None:
                instant = _instant(c, span[2])
                if instant < span[1]:
                    return instant
        return self._next_across(due)

    _span: tuple[float, float, int] | None = None

    def _next_across(self, due: float) -> float | None:
        zone, spec = self.zone, self.spec
        off = _offset(zone, due)
        pending = transitions(zone, due)
        prev = _transition_at_or_before(zone, due)
        # Fixed-time entries skip the second pass of a repeated hour: inside it, walls
        # before the end of the repeated hour were already run on the first pass.
        skip_below: datetime | None = None
        span_start = float(prev[0]) if prev is not None else -math.inf
        if not self.wildcard and prev is not None and prev[2] < prev[1]:
            span_start = float(prev[0] + prev[1] - prev[2])
            if due < span_start:
                skip_below = _wall(prev[0], prev[1])
        span_end = float(pending[0][0]) if pending else _year_start(due, 2)
        self._span = (span_start, span_end, off)
        wall = _wall(due, off)
        year = datetime.fromtimestamp(due, UTC).year + 2  # the first year not looked at
        while True:
            c = spec.next_match(wall)
            if c is None:
                return None
            if skip_below is not None and c < skip_below:
                c = spec.next_match(skip_below - _TINY)
                if c is None:
                    return None
            instant = _instant(c, off)
            if not pending:
                # no change up to the years looked at: look further if the match is beyond
                horizon = datetime(year, 1, 1, tzinfo=UTC).timestamp()
                if instant < horizon or year > 2400:
                    return instant
                pending = list(_year_transitions(zone, year))
                year += 1
                continue
            t, before, after = pending[0]
            if instant < t:
                return instant
            pending.pop(0)
            start_after = _wall(t, after)
            if after > before:  # a gap: walls [t+before, t+after) do not exist
                if c < start_after and not self.wildcard:
                    return float(t)
                wall = start_after - _TINY
            else:  # a repeated hour: walls restart at t+after
                wall = start_after - _TINY
                skip_below = None if self.wildcard else _wall(t, before)
            off = after

    def count_between(self, due: float, now: float) -> int:
        """Due times ``d`` with ``due < d <= now`` (the same answers as iterating
        :meth:`next_after`, in a few operations per day and per transition)."""
        if now <= due:
            return 0
        zone, spec = self.zone, self.spec
        off = _offset(zone, due)
        lo = _wall(due, off)
        if not self.wildcard:
            prev = _transition_at_or_before(zone, due)
            if prev is not None and prev[2] < prev[1] and due < prev[0] + prev[1] - prev[2]:
                lo = max(lo, _wall(prev[0], prev[1]) - timedelta(seconds=1))
        years = datetime.fromtimestamp(now, UTC).year - datetime.fromtimestamp(due, UTC).year + 1
        total = 0
        for t, before, after in transitions(zone, due, years):
            if t > now:
                break
            total += spec.count(lo, _wall(t - 1, off))
            start_after = _wall(t, after)
            if after > before:
                in_gap = spec.count(_wall(t - 1, before), start_after)  # [t+before, t+after]
                if not self.wildcard and in_gap:
                    total += 1
                    lo = start_after  # a match at the gap's end is the same run
                else:
                    lo = start_after - timedelta(seconds=1)
            else:
                lo = start_after - timedelta(seconds=1)
                if not self.wildcard:
                    lo = _wall(t, before) - timedelta(seconds=1)
            off = after
        return total + spec.count(lo, _wall(now, off))


def _days_in_month(year: int, month: int) -> int:
    return calendar.monthrange(year, month)[1]


class CalendarTrigger:
    """Every ``days``/``weeks``/``months``/``years`` at a wall-clock time, counted from
    ``start`` (a date, default 1970-01-01); for months and years on ``day`` (default
    the start's day), clamped to the month's length (the 31st is the 30th in April)."""

    recurring = True

    def __init__(
        self,
        *,
        days: int = 0,
        weeks: int = 0,
        months: int = 0,
        years: int = 0,
        at: str = "00:00",
        day: int | None = None,
        start: str | date | None = None,
        tz: str | None = None,
    ) -> None:
        for name, value in (("days", days), ("weeks", weeks), ("months", months), ("years", years)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"calendar: {name} must be a non-negative integer, got {value!r}")
        self.span_days = days + 7 * weeks
        self.span_months = months + 12 * years
        if bool(self.span_days) == bool(self.span_months):
            raise ValueError(
                "calendar: give a step in days/weeks or in months/years (one kind, not zero)"
            )
        try:
            parts = [int(x) for x in str(at).split(":")]
            if not 2 <= len(parts) <= 3:
                raise ValueError
            hh, mm, ss = ([*parts, 0])[:3] if len(parts) == 2 else parts
            datetime(2000, 1, 1, hh, mm, ss)
            self.time = (hh, mm, ss)
        except (ValueError, TypeError):
            raise ValueError(f"calendar: at={at!r} is not a time like 08:00 or 08:00:30") from None
        if isinstance(start, str):
            try:
                start = date.fromisoformat(start)
            except ValueError:
                raise ValueError(f"calendar: start={start!r} is not a date (YYYY-MM-DD)") from None
        self.start = start or date(1970, 1, 1)
        if not isinstance(self.start, date) or not 1900 <= self.start.year < 9000:
            raise ValueError(f"calendar: start={start!r} is not a date from 1900 to 9000")
        if day is not None and (not isinstance(day, int) or not 1 <= day <= 31):
            raise ValueError(f"calendar: day must be 1..31, got {day!r}")
        if day is not None and self.span_days:
            raise ValueError("calendar: day= applies to steps in months or years")
        self.day = day or self.start.day
        self.zone_name = tz or "UTC"
        self.zone = parse_zone(self.zone_name)
        self.args = {
            "days": days,
            "weeks": weeks,
            "months": months,
            "years": years,
            "at": "{:02d}:{:02d}:{:02d}".format(*self.time),
            "day": day,
            "start": self.start.isoformat(),
            "tz": self.zone_name,
        }
        shown = ", ".join(f"{k}={v}" for k, v in self.args.items() if v not in (0, None))
        self.description = f"calendar({shown})"

    def to_dict(self) -> dict[str, Any]:
        return {"calendar": {k: v for k, v in self.args.items() if v not in (0, None)}}

    def _date(self, k: int) -> date:
        if self.span_days:
            return self.start + timedelta(days=k * self.span_days)
        m = self.start.month - 1 + k * self.span_months
        year, month = self.start.year + m // 12, m % 12 + 1
        return date(year, month, min(self.day, _days_in_month(year, month)))

    def _instant(self, d: date) -> float:
        """The first instant showing wall time ``d self.time``; in a gap, its end."""
        hh, mm, ss = self.time
        naive = datetime(d.year, d.month, d.day, hh, mm, ss)
        t0 = naive.replace(tzinfo=self.zone, fold=0).timestamp()
        t1 = naive.replace(tzinfo=self.zone, fold=1).timestamp()
        first = min(t0, t1)
        if datetime.fromtimestamp(first, self.zone).replace(tzinfo=None) == naive:
            return first
        # in a gap: the transition instant between the two readings
        for t, _, _ in transitions(self.zone, first - 1, 1):
            return float(t)
        return first

    def first(self, now: float) -> float | None:
        return self.next_after(now)

    def next_after(self, due: float) -> float | None:
        local = datetime.fromtimestamp(due, self.zone).date()
        if self.span_days:
            k = max(0, (local - self.start).days // self.span_days - 1)
        else:
            months = (local.year - self.start.year) * 12 + local.month - self.start.month
            k = max(0, months // self.span_months - 1)
        for _ in range(100_000):
            try:
                instant = self._instant(self._date(k))
            except (OverflowError, ValueError):
                return None
            if instant > due:
                return instant
            k += 1
        return None


class AnyOf:
    """Due whenever any of its triggers is (the earliest next time of the parts)."""

    def __init__(self, parts: Sequence[Trigger]) -> None:
        if len(parts) < 2:
            raise ValueError("any: combine at least two triggers")
        self.parts = tuple(parts)
        self.recurring = any(p.recurring for p in parts)
        self.description = "any(" + "; ".join(p.description for p in parts) + ")"

    def to_dict(self) -> dict[str, Any]:
        return {"any": [p.to_dict() for p in self.parts]}

    def first(self, now: float) -> float | None:
        times = [t for t in (p.first(now) for p in self.parts) if t is not None]
        return min(times) if times else None

    def next_after(self, due: float) -> float | None:
        times = [t for t in (p.next_after(due) for p in self.parts) if t is not None]
        return min(times) if times else None


class AllOf:
    """Due when all of its triggers are due at the same instant (searched at most
    :data:`ALL_OF_STEPS` steps ahead; past that, never).

    The bound is shared by the ``all`` triggers nested in one another: an ``all`` of
    ``all`` triggers searches at most that many steps in total, not that many per level (a
    nesting would otherwise multiply them, and a search runs on the event loop)."""

    def __init__(self, parts: Sequence[Trigger]) -> None:
        if len(parts) < 2:
            raise ValueError("all: combine at least two triggers")
        self.parts = tuple(parts)
        self.recurring = all(p.recurring for p in parts)
        self.description = "all(" + "; ".join(p.description for p in parts) + ")"

    def to_dict(self) -> dict[str, Any]:
        return {"all": [p.to_dict() for p in self.parts]}

    def first(self, now: float) -> float | None:
        with _search_budget():
            return self._meet([p.first(now) for p in self.parts])

    def next_after(self, due: float) -> float | None:
        with _search_budget():
            return self._meet([p.next_after(due) for p in self.parts])

    def _meet(self, times: list[float | None]) -> float | None:
        while _budget.left > 0:
            _budget.left -= 1
            if any(t is None for t in times):
                return None
            top = max(t for t in times if t is not None)
            if all(t == top for t in times):
                return top
            times = [
                t if t is not None and t >= top else p.next_after(top - 1e-6)
                for p, t in zip(self.parts, times, strict=True)
            ]
        return None


#: Steps an ``all`` trigger (with the ``all`` triggers nested in it) searches for an
#: instant where its parts meet.
ALL_OF_STEPS = 10_000

_budget = threading.local()


@contextlib.contextmanager
def _search_budget() -> Iterator[None]:
    """Give the outermost ``all`` search :data:`ALL_OF_STEPS` steps; nested ones share them."""
    if getattr(_budget, "left", None) is not None:
        yield
        return
    _budget.left = ALL_OF_STEPS
    try:
        yield
    finally:
        _budget.left = None


class Bounded:
    """A trigger that is not due before ``start`` nor after ``end``."""

    def __init__(self, inner: Trigger, start: float | None, end: float | None) -> None:
        if start is not None and end is not None and end <= start:
            raise ValueError("end must be after start")
        self.inner, self.start, self.end = inner, start, end
        self.recurring = inner.recurring
        bounds = []
        if start is not None:
            bounds.append(f"from {_iso(start)}")
        if end is not None:
            bounds.append(f"until {_iso(end)}")
        self.description = f"{inner.description} {' '.join(bounds)}"

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.inner.to_dict())
        if self.start is not None:
            out["start"] = _iso(self.start)
        if self.end is not None:
            out["end"] = _iso(self.end)
        return out

    def _cut(self, t: float | None) -> float | None:
        return None if t is None or (self.end is not None and t > self.end) else t

    def first(self, now: float) -> float | None:
        if self.start is not None and now < self.start:
            return self._cut(self.inner.next_after(self.start - 1e-6))
        return self._cut(self.inner.first(now))

    def next_after(self, due: float) -> float | None:
        if self.start is not None and due < self.start:
            due = self.start - 1e-6
        return self._cut(self.inner.next_after(due))


def on_grid(trigger: Trigger, anchor: float = 0.0) -> Trigger:
    """``trigger`` with each interval that has no declared start put on a shared grid:
    due at ``anchor + k * every`` (by default the multiples of the interval since the
    Unix epoch), inside ``any``, ``all`` and bounds too (bounded by a ``start``, the
    grid starts there).

    A cluster schedules with it, and so does one node for an ``any`` or ``all`` (a due
    time carries one phase: parts counted from the registration could not be followed
    together, see ``specs._combines``). Without a start, an interval is due at
    ``registration + k * every``: each node has a phase of its own. Claims still agree
    (an interval's claim key is its period's index), but a node whose phase comes
    earlier in a period took over the runs of the task's first node before that node's
    due time came, and a node whose period started just past a boundary ran every task
    of the cluster (an ``any`` with such an interval, keyed by its instant, ran once per
    node). On the grid every node computes the same instants. Other triggers are
    instants already.
    """
    if isinstance(trigger, IntervalTrigger):
        if trigger.anchor is not None:
            return trigger
        return IntervalTrigger(trigger.every, anchor=anchor, implicit=True)
    if isinstance(trigger, AnyOf):
        return AnyOf([on_grid(p, anchor) for p in trigger.parts])
    if isinstance(trigger, AllOf):
        return AllOf([on_grid(p, anchor) for p in trigger.parts])
    if isinstance(trigger, Bounded):
        start = trigger.start if trigger.start is not None else anchor
        return Bounded(on_grid(trigger.inner, start), trigger.start, trigger.end)
    return trigger


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


_KINDS = ("cron", "every", "at", "after", "calendar", "any", "all")


def parse_trigger(value: Any, tz: str | None = None) -> Trigger:
    """A trigger from its dict form (what :meth:`Trigger.to_dict` gives), or a trigger.

    ``{"cron": "0 8 * * mon", "tz": "Europe/Paris"}``, ``{"every": "30s"}``,
    ``{"at": "2026-12-01T08:00:00+01:00"}``, ``{"after": "10m"}``,
    ``{"calendar": {"months": 2, "day": 31, "at": "08:00"}}``,
    ``{"any": [...]}`` / ``{"all": [...]}``; each may add ``"start"`` / ``"end"``
    (ISO 8601 instants).
    """
    if isinstance(value, IntervalTrigger | DateTrigger | AfterTrigger):
        return value
    if isinstance(value, CronTrigger | CalendarTrigger | AnyOf | AllOf | Bounded):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"trigger: expected a trigger or a mapping, got {value!r}")
    kinds = [k for k in _KINDS if k in value]
    unknown = set(value) - {*_KINDS, "tz", "start", "end"}
    if unknown:
        raise ValueError(f"trigger: unknown key(s) {', '.join(sorted(unknown))}")
    if len(kinds) != 1:
        raise ValueError(f"trigger: give exactly one of {', '.join(_KINDS)}, got {kinds or 'none'}")
    zone = value.get("tz") or tz
    start = parse_at(value["start"], zone, "start") if value.get("start") is not None else None
    end = parse_at(value["end"], zone, "end") if value.get("end") is not None else None
    kind = kinds[0]
    trigger: Trigger
    if kind == "cron":
        trigger = CronTrigger(value["cron"], zone)
    elif kind == "every":
        every = parse_duration(value["every"], "every")
        if every <= 0:
            raise ValueError("every: the interval must be positive")
        if start is not None and end is not None and end <= start:
            raise ValueError("end must be after start")
        return _bound(IntervalTrigger(every, anchor=start), None, end)
    elif kind == "at":
        trigger = DateTrigger(parse_at(value["at"], zone))
    elif kind == "after":
        trigger = AfterTrigger(parse_duration(value["after"], "after"))
    elif kind == "calendar":
        options = value["calendar"]
        if not isinstance(options, Mapping):
            raise ValueError(f"calendar: expected a mapping of options, got {options!r}")
        try:
            trigger = CalendarTrigger(**{"tz": zone, **options})
        except TypeError as exc:
            raise ValueError(f"calendar: {exc}") from None
    else:
        parts = value[kind]
        if not isinstance(parts, Sequence) or isinstance(parts, str):
            raise ValueError(f"{kind}: expected a list of triggers, got {parts!r}")
        subs = [parse_trigger(p, zone) for p in parts]
        trigger = AnyOf(subs) if kind == "any" else AllOf(subs)
    if (start is not None or end is not None) and not trigger.recurring:
        raise ValueError(f"start/end bounds apply to recurring triggers, not {kind!r}")
    return _bound(trigger, start, end)


def _bound(trigger: Trigger, start: float | None, end: float | None) -> Trigger:
    return trigger if start is None and end is None else Bounded(trigger, start, end)


def catch_up(
    trigger: Trigger, due: float, now: float, cap: int = 1_000
) -> tuple[int, float, float | None]:
    """Due times from ``due`` up to ``now``: (how many, the latest, the next one after now).

    ``due`` itself counts as the first. Interval triggers are counted arithmetically,
    cron triggers with :meth:`CronTrigger.count_between`; others are iterated at most
    ``cap`` steps (the count is then a lower bound). The latest due time is found by
    searching back from ``now`` in widening windows, so a long downtime costs a few
    steps, not one per missed run — this runs on the event loop.
    """
    if now < due:
        return 1, due, trigger.next_after(due)
    inner, upto = trigger, now
    if isinstance(trigger, Bounded) and trigger.start is None and trigger.end is not None:
        inner, upto = trigger.inner, min(now, trigger.end)  # `every=` with `end=`
    if isinstance(inner, IntervalTrigger):
        if inner.anchor is None:  # due + k * every
            n = max(1, int((upto - due) // inner.every) + 1)
            last = due + (n - 1) * inner.every
        else:
            # the anchor's instants after `due` (which may lie off them: one adopted
            # from the log), taken as `next_after` gives them
            first, end = inner.index_after(due), inner.index_after(upto)
            n, last = (1 + end - first, inner.at(end - 1)) if end > first else (1, due)
        return n, last, trigger.next_after(last)
    nxt = trigger.next_after(due)
    if nxt is None or nxt > now:
        return 1, due, nxt
    probe: float | None = nxt
    if isinstance(trigger, CronTrigger):
        count = 1 + trigger.count_between(due, now)
    elif isinstance(trigger, Bounded) and isinstance(trigger.inner, CronTrigger):
        upto = now if trigger.end is None else min(now, trigger.end)
        count = 1 + trigger.inner.count_between(due, upto)
    else:
        count = 1
        while probe is not None and probe <= now and count < cap:
            count += 1
            probe = trigger.next_after(probe)
    # the latest due time at or before `now`: widen a window back from `now`
    window = 1.0
    while True:
        start = max(due, now - window)
        probe = trigger.next_after(start) if start > due else nxt
        if start == due or (probe is not None and probe <= now):
            break
        window *= 4
    last = due
    while probe is not None and probe <= now:
        last = probe
        probe = trigger.next_after(probe)
    return count, last, probe
