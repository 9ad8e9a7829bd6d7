"""Triggers: when a task falls due. Times are UTC epoch seconds.

A trigger answers two questions: the first due time when a task is registered
(:meth:`Trigger.first`) and the next due time strictly after a given one
(:meth:`Trigger.next_after`). :func:`catch_up` uses the latter to count the due times a
stopped process missed.

Cron across daylight-saving changes follows Vixie cron's rule. For a *fixed-time*
expression (neither the minute nor the hour field starts with ``*``): a local time that
falls in a skipped hour runs once, right after the gap; a local time in a repeated hour
runs once, on its first pass. For a *wildcard* expression (``*/5 * * * *``,
``0 * * * *``) nothing is shifted: times in the gap do not exist, and the repeated hour
runs on both passes. croniter alone runs fixed-time entries twice in the repeated
hour, so the expression is iterated on naive wall-clock times and each one is mapped
to instants here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

__all__ = [
    "AfterTrigger",
    "CronTrigger",
    "DateTrigger",
    "IntervalTrigger",
    "Trigger",
    "catch_up",
    "parse_duration",
    "parse_zone",
]

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")


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
    return seconds


def parse_zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r}") from None


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


@dataclass(frozen=True)
class IntervalTrigger:
    every: float
    description: str = ""
    recurring: bool = True

    def __post_init__(self) -> None:
        if self.every <= 0:
            raise ValueError(f"every: the interval must be positive, got {self.every!r}")
        object.__setattr__(self, "description", f"every {self.every:g}s")

    def first(self, now: float) -> float:
        return now + self.every

    def next_after(self, due: float) -> float:
        return due + self.every


@dataclass(frozen=True)
class DateTrigger:
    """Once, at a fixed instant (``at=``)."""

    at: float
    description: str = ""
    recurring: bool = False

    def __post_init__(self) -> None:
        when = datetime.fromtimestamp(self.at, UTC).isoformat()
        object.__setattr__(self, "description", f"at {when}")

    def first(self, now: float) -> float:
        return self.at

    def next_after(self, due: float) -> None:
        return None


@dataclass(frozen=True)
class AfterTrigger:
    """Once, ``delay`` seconds after the task is first registered (``after=``)."""

    delay: float
    description: str = ""
    recurring: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "description", f"after {self.delay:g}s")

    def first(self, now: float) -> float:
        return now + self.delay

    def next_after(self, due: float) -> None:
        return None


class CronTrigger:
    """A five-field cron expression evaluated in a time zone (default UTC)."""

    recurring = True

    def __init__(self, expression: str, tz: str | None = None) -> None:
        fields = expression.split()
        if len(fields) != 5:
            raise ValueError(
                f"cron {expression!r}: expected 5 fields (minute hour day month weekday), "
                f"got {len(fields)}"
            )
        if not croniter.is_valid(expression):
            raise ValueError(f"cron {expression!r} is not a valid cron expression")
        self.expression = " ".join(fields)
        self.zone_name = tz or "UTC"
        self.zone = parse_zone(self.zone_name)
        self.wildcard = fields[0].startswith("*") or fields[1].startswith("*")
        self.description = f"cron '{self.expression}' {self.zone_name}"

    def first(self, now: float) -> float | None:
        return self.next_after(now)

    def next_after(self, due: float) -> float | None:
        zone = self.zone
        local = datetime.fromtimestamp(due, zone)
        offset = local.utcoffset()
        stable = all(
            datetime.fromtimestamp(due + d, zone).utcoffset() == offset for d in (-14400, 14400)
        )
        if stable:
            # No transition near: the next wall-clock match is the answer if it maps
            # to an instant with the same offset.
            it = croniter(self.expression, local.replace(tzinfo=None))
            candidate: datetime = it.get_next(datetime)
            instants = self._instants(candidate)
            if len(instants) == 1 and instants[0] > due:
                aware = candidate.replace(tzinfo=zone)
                if aware.utcoffset() == offset:
                    return instants[0]
        return self._next_slow(due, local.replace(tzinfo=None))

    def _next_slow(self, due: float, wall: datetime) -> float | None:
        it = croniter(self.expression, wall - timedelta(hours=3))
        best: float | None = None
        horizon: datetime | None = None
        for _ in range(100_000):
            naive: datetime = it.get_next(datetime)
            if horizon is not None and naive > horizon:
                break
            for instant in self._instants(naive):
                if instant > due and (best is None or instant < best):
                    best = instant
                    if horizon is None:
                        horizon = naive + timedelta(hours=3)
        return best

    def _instants(self, naive: datetime) -> list[float]:
        """The instants a wall-clock time maps to under the DST rule above."""
        zone = self.zone
        first = naive.replace(tzinfo=zone, fold=0)
        second = naive.replace(tzinfo=zone, fold=1)
        if first.utcoffset() == second.utcoffset():
            return [first.timestamp()]
        t0, t1 = first.timestamp(), second.timestamp()
        if datetime.fromtimestamp(t0, zone).replace(tzinfo=None) == naive:
            # the repeated hour: fold 0 is the first pass
            return [t0, t1] if self.wildcard else [t0]
        if self.wildcard:
            return []
        return [self._gap_end(min(t0, t1), max(t0, t1))]

    def _gap_end(self, lo: float, hi: float) -> float:
        """The transition instant in (lo, hi]: where the offset after the gap begins."""
        zone = self.zone
        after = datetime.fromtimestamp(hi, zone).utcoffset()
        lo_i, hi_i = math.floor(lo), math.ceil(hi)
        while hi_i - lo_i > 1:
            mid = (lo_i + hi_i) // 2
            if datetime.fromtimestamp(mid, zone).utcoffset() == after:
                hi_i = mid
            else:
                lo_i = mid
        return float(hi_i)


def catch_up(
    trigger: Trigger, due: float, now: float, cap: int = 1_000
) -> tuple[int, float, float | None]:
    """Due times from ``due`` up to ``now``: (how many, the latest, the next one after now).

    ``due`` itself counts as the first. Interval triggers are counted arithmetically;
    others are iterated at most ``cap`` steps (the count is then a lower bound), and the
    latest due time is found by searching back from ``now`` — this runs on the event
    loop, so a month of downtime for a per-minute cron must not mean 43,200 steps.
    """
    if isinstance(trigger, IntervalTrigger):
        if now < due:
            return 1, due, trigger.next_after(due)
        n = int((now - due) // trigger.every) + 1
        last = due + (n - 1) * trigger.every
        return n, last, last + trigger.every
    count, last = 1, due
    nxt = trigger.next_after(due)
    while nxt is not None and nxt <= now and count < cap:
        count += 1
        last = nxt
        nxt = trigger.next_after(nxt)
    if nxt is not None and nxt <= now:
        # past the cap: widen a window back from `now` until it holds a due time
        window = 60.0
        while True:
            start = max(last, now - window)
            probe = trigger.next_after(start)
            if start == last or (probe is not None and probe <= now):
                break
            window *= 2
        nxt = probe
        while nxt is not None and nxt <= now:
            last = nxt
            nxt = trigger.next_after(nxt)
    return count, last, nxt


def parse_at(value: str | datetime, tz: str | None) -> float:
    """The instant of ``at=``: an ISO 8601 string or a datetime (naive means ``tz``)."""
    if isinstance(value, str):
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"at: {value!r} is not an ISO 8601 date and time") from None
    elif isinstance(value, datetime):
        when = value
    else:
        raise ValueError(f"at: expected an ISO 8601 string or a datetime, got {value!r}")
    if when.tzinfo is None:
        when = when.replace(tzinfo=parse_zone(tz or "UTC"))
    return when.timestamp()
