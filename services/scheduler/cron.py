"""Cron expressions on wall-clock time: parsing, the next match, and counting matches.

A :class:`CronSpec` knows nothing of time zones: it answers "the first wall-clock time
strictly after this one that matches" and "how many wall-clock times in this range
match", on naive datetimes. Mapping wall-clock times to instants (and the
daylight-saving rule) is :class:`~.triggers.CronTrigger`'s job.

Syntax: five fields ``minute hour day month weekday``, or six with the seconds first
(``second minute hour day month weekday``). Each field is ``*``, a number, a range
``a-b``, a step ``*/n`` or ``a-b/n`` or ``a/n``, or a comma-separated list of those;
months and weekdays also take English names (``jan``, ``mon``); weekday 0 and 7 are
Sunday; ``?`` is ``*``. Aliases: ``@yearly`` (``@annually``), ``@monthly``, ``@weekly``,
``@daily`` (``@midnight``), ``@hourly``. When both the day and the weekday fields are
restricted, a day matches if *either* does (Vixie cron's rule); otherwise both must.

The next match is found field by field (a month, then a day, an hour, a minute, a
second), so a step costs a few datetime operations whatever the expression; counting
works a day at a time with arithmetic on the sorted field values.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta

__all__ = ["ALIASES", "CronSpec", "parse_cron"]

ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

_MONTHS = {
    m: i + 1
    for i, m in enumerate(
        ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
    )
}
_DAYS = {d: i for i, d in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])}
#: How far ahead a next match is searched before the expression is declared never due.
HORIZON_YEARS = 30

_SECOND = timedelta(seconds=1)


@dataclass(frozen=True)
class CronSpec:
    """A parsed cron expression (sorted tuples of the values each field allows)."""

    expression: str
    seconds: tuple[int, ...]
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: tuple[int, ...]
    months: tuple[int, ...]
    #: 0 = Sunday ... 6 = Saturday
    weekdays: tuple[int, ...]
    day_restricted: bool
    weekday_restricted: bool
    #: the minute or the hour field starts with ``*`` (see the DST rule in triggers.py)
    wildcard: bool

    # -- matching ------------------------------------------------------------------------

    def day_matches(self, d: date) -> bool:
        if d.month not in self._month_set:
            return False
        dom = d.day in self._day_set
        dow = (d.weekday() + 1) % 7 in self._weekday_set
        if self.day_restricted and self.weekday_restricted:
            return dom or dow
        return dom and dow

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hour_set", frozenset(self.hours))
        object.__setattr__(self, "_minute_set", frozenset(self.minutes))
        object.__setattr__(self, "_second_set", frozenset(self.seconds))
        object.__setattr__(self, "_month_set", frozenset(self.months))
        object.__setattr__(self, "_day_set", frozenset(self.days))
        object.__setattr__(self, "_weekday_set", frozenset(self.weekdays))

    _hour_set: frozenset[int] = field(init=False, default=frozenset(), repr=False, compare=False)
    _minute_set: frozenset[int] = field(init=False, default=frozenset(), repr=False, compare=False)
    _second_set: frozenset[int] = field(init=False, default=frozenset(), repr=False, compare=False)
    _month_set: frozenset[int] = field(init=False, default=frozenset(), repr=False, compare=False)
    _day_set: frozenset[int] = field(init=False, default=frozenset(), repr=False, compare=False)
    _weekday_set: frozenset[int] = field(init=False, default=frozenset(), repr=False, compare=False)

    def next_match(self, after: datetime) -> datetime | None:
        """The first matching wall-clock time strictly after ``after`` (naive)."""
        t = after.replace(microsecond=0) + _SECOND
        limit = t.year + HORIZON_YEARS
        hours, minutes, seconds = self.hours, self.minutes, self.seconds
        while t.year <= limit:
            if t.month not in self._month_set:
                i = bisect_left(self.months, t.month)
                if i < len(self.months):
                    t = datetime(t.year, self.months[i], 1)
                else:
                    t = datetime(t.year + 1, self.months[0], 1)
                continue
            if not self.day_matches(t.date()):
                t = datetime(t.year, t.month, t.day) + timedelta(days=1)
                continue
            if t.hour not in self._hour_set:
                i = bisect_left(hours, t.hour)
                if i < len(hours):
                    t = t.replace(hour=hours[i], minute=0, second=0)
                else:
                    t = datetime(t.year, t.month, t.day) + timedelta(days=1)
                continue
            if t.minute not in self._minute_set:
                i = bisect_left(minutes, t.minute)
                if i < len(minutes):
                    t = t.replace(minute=minutes[i], second=0)
                else:
                    t = t.replace(minute=0, second=0) + timedelta(hours=1)
                continue
            if t.second not in self._second_set:
                i = bisect_left(seconds, t.second)
                if i < len(seconds):
                    t = t.replace(second=seconds[i])
                else:
                    t = t.replace(second=0) + timedelta(minutes=1)
                continue
            return t
        return None

    # -- counting ------------------------------------------------------------------------

    def count(self, lo: datetime, hi: datetime) -> int:
        """How many matching wall-clock times ``w`` have ``lo < w <= hi``."""
        if hi <= lo:
            return 0
        total = 0
        day = lo.date()
        last = hi.date()
        while day <= last:
            if self.day_matches(day):
                upper = self._upto(hi.time()) if day == last else self._per_day
                lower = self._upto(lo.time()) if day == lo.date() else 0
                total += upper - lower
            day += timedelta(days=1)
        return total

    @property
    def _per_day(self) -> int:
        return len(self.hours) * len(self.minutes) * len(self.seconds)

    def _upto(self, t: time) -> int:
        """Matching times of one (matching) day at or before ``t`` (whole seconds)."""
        ns, nm = len(self.seconds), len(self.minutes)
        n = bisect_left(self.hours, t.hour) * nm * ns
        if t.hour in self.hours:
            n += bisect_left(self.minutes, t.minute) * ns
            if t.minute in self.minutes:
                n += bisect_right(self.seconds, t.second)
        return n


def _values(text: str, lo: int, hi: int, names: dict[str, int] | None, what: str) -> set[int]:
    values: set[int] = set()
    for part in text.split(","):
        if not part:
            raise ValueError(f"{what}: empty list item in {text!r}")
        step, stepped = 1, "/" in part
        if stepped:
            part, _, step_text = part.partition("/")
            if not step_text.isdigit() or int(step_text) < 1:
                raise ValueError(f"{what}: bad step {step_text!r} in {text!r}")
            step = int(step_text)
        if part in ("*", "?"):
            start, end = lo, hi
        elif "-" in part:
            a, _, b = part.partition("-")
            start, end = _value(a, lo, hi, names, what), _value(b, lo, hi, names, what)
            if start > end:
                raise ValueError(f"{what}: range {part!r} goes backwards")
        else:
            start = _value(part, lo, hi, names, what)
            end = hi if stepped else start
        values.update(range(start, end + 1, step))
    return values


def _value(text: str, lo: int, hi: int, names: dict[str, int] | None, what: str) -> int:
    key = text.lower()
    if names is not None and key in names:
        return names[key]
    if not text.isdigit():
        raise ValueError(f"{what}: {text!r} is not a number" + (" or a name" if names else ""))
    value = int(text)
    if not lo <= value <= hi:
        raise ValueError(f"{what}: {value} is out of range {lo}-{hi}")
    return value


def parse_cron(expression: str) -> CronSpec:
    """Parse ``expression``; raises ``ValueError`` naming the bad field."""
    if not isinstance(expression, str):
        raise ValueError(f"cron must be a string, got {expression!r}")
    text = " ".join(expression.split())
    fields = ALIASES.get(text.lower(), text).split()
    if text.startswith("@") and text.lower() not in ALIASES:
        raise ValueError(f"cron {expression!r}: unknown alias (known: {', '.join(ALIASES)})")
    if len(fields) == 5:
        fields = ["0", *fields]
    elif len(fields) != 6:
        raise ValueError(
            f"cron {expression!r}: expected 5 fields (minute hour day month weekday) or 6 "
            f"(second first), got {len(fields)}"
        )
    second, minute, hour, day, month, weekday = fields
    try:
        weekdays = _values(weekday, 0, 7, _DAYS, "weekday")
        parsed = CronSpec(
            expression=text,
            seconds=tuple(sorted(_values(second, 0, 59, None, "second"))),
            minutes=tuple(sorted(_values(minute, 0, 59, None, "minute"))),
            hours=tuple(sorted(_values(hour, 0, 23, None, "hour"))),
            days=tuple(sorted(_values(day, 1, 31, None, "day"))),
            months=tuple(sorted(_values(month, 1, 12, _MONTHS, "month"))),
            weekdays=tuple(sorted({d % 7 for d in weekdays})),
            day_restricted=day not in ("*", "?"),
            weekday_restricted=weekday not in ("*", "?"),
            wildcard=minute.startswith("*") or hour.startswith("*"),
        )
    except ValueError as exc:
        raise ValueError(f"cron {expression!r} is not a valid cron expression: {exc}") from None
    return parsed
