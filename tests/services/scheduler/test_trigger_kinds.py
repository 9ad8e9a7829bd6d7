"""Trigger kinds: seconds and aliases, bounds, calendar intervals, combinations; the
transition-aware cron step (exact, and a few steps, not a scan)."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from services.scheduler.cron import CronSpec, parse_cron
from services.scheduler.triggers import (
    CronTrigger,
    Trigger,
    catch_up,
    parse_trigger,
)


def fires(trigger: Trigger, start: str, n: int, tz: str = "UTC") -> list[str]:
    zone = ZoneInfo(tz)
    t: float | None = datetime.fromisoformat(start).timestamp()
    out = []
    for _ in range(n):
        assert t is not None
        t = trigger.next_after(t)
        if t is None:
            break
        out.append(datetime.fromtimestamp(t, zone).isoformat())
    return out


def test_six_fields_put_the_seconds_first() -> None:
    trigger = parse_trigger({"cron": "*/20 * * * * *"})
    assert fires(trigger, "2026-01-01T00:00:00+00:00", 4) == [
        "2026-01-01T00:00:20+00:00",
        "2026-01-01T00:00:40+00:00",
        "2026-01-01T00:01:00+00:00",
        "2026-01-01T00:01:20+00:00",
    ]


@pytest.mark.parametrize(
    ("alias", "expected"),
    [
        ("@hourly", "2026-01-15T11:00:00+00:00"),
        ("@daily", "2026-01-16T00:00:00+00:00"),
        ("@midnight", "2026-01-16T00:00:00+00:00"),
        ("@weekly", "2026-01-18T00:00:00+00:00"),  # Sunday
        ("@monthly", "2026-02-01T00:00:00+00:00"),
        ("@yearly", "2027-01-01T00:00:00+00:00"),
        ("@annually", "2027-01-01T00:00:00+00:00"),
    ],
)
def test_aliases(alias: str, expected: str) -> None:
    assert fires(CronTrigger(alias), "2026-01-15T10:30:00+00:00", 1) == [expected]


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("@fortnightly", "unknown alias"),
        ("* * * * * * *", "expected 5 fields"),
        ("60 * * * * *", "second: 60 is out of range"),
        ("0 25 * * *", "hour: 25 is out of range"),
        ("0 0 * foo *", "month: 'foo' is not a number or a name"),
        ("0 0 5-1 * *", "goes backwards"),
        ("*/0 * * * *", "bad step"),
    ],
)
def test_bad_cron_names_the_field(expr: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_cron(expr)


def test_names_weekday_seven_and_the_vixie_day_rule() -> None:
    spec: CronSpec = parse_cron("0 12 13 * fri")
    # day 13 OR Friday, as Vixie cron does when both are restricted
    t = datetime(2026, 2, 1)
    days = []
    for _ in range(4):
        nxt = spec.next_match(t)
        assert nxt is not None
        days.append(nxt.day)
        t = nxt
    assert days == [6, 13, 20, 27]  # Fridays, and the 13th (itself a Friday)
    assert parse_cron("0 0 * * 7").weekdays == (0,)


def test_start_and_end_bound_a_recurring_trigger() -> None:
    trigger = parse_trigger(
        {"every": "1h", "start": "2026-01-01T10:30:00+00:00", "end": "2026-01-01T13:00:00+00:00"}
    )
    assert fires(trigger, "2026-01-01T00:00:00+00:00", 5) == [
        "2026-01-01T10:30:00+00:00",
        "2026-01-01T11:30:00+00:00",
        "2026-01-01T12:30:00+00:00",
    ]
    cron = parse_trigger({"cron": "0 * * * *", "start": "2026-01-01T05:00:00+00:00"})
    assert cron.first(datetime(2026, 1, 1, tzinfo=UTC).timestamp()) == (
        datetime(2026, 1, 1, 5, tzinfo=UTC).timestamp()
    )
    with pytest.raises(ValueError, match="end must be after start"):
        parse_trigger({"cron": "@daily", "start": "2026-02-01T00:00:00", "end": "2026-01-01"})
    with pytest.raises(ValueError, match="apply to recurring triggers"):
        parse_trigger({"at": "2026-02-01T00:00:00", "end": "2026-03-01T00:00:00"})


def test_calendar_every_two_months_on_the_31st_is_clamped() -> None:
    trigger = parse_trigger(
        {"calendar": {"months": 2, "day": 31, "at": "08:00", "start": "2026-01-01"}}
    )
    assert fires(trigger, "2026-01-01T00:00:00+00:00", 6) == [
        "2026-01-31T08:00:00+00:00",
        "2026-03-31T08:00:00+00:00",
        "2026-05-31T08:00:00+00:00",
        "2026-07-31T08:00:00+00:00",
        "2026-09-30T08:00:00+00:00",  # clamped
        "2026-11-30T08:00:00+00:00",  # clamped
    ]
    monthly = parse_trigger({"calendar": {"months": 1, "day": 31, "start": "2028-01-01"}})
    assert fires(monthly, "2028-01-31T12:00:00+00:00", 1) == ["2028-02-29T00:00:00+00:00"]


def test_calendar_follows_the_fixed_time_dst_rule() -> None:
    # 02:30 every day in Paris: in the gap (29 March) it runs when the gap ends; in the
    # repeated hour (25 October) once, on the first pass
    trigger = parse_trigger({"calendar": {"days": 1, "at": "02:30"}, "tz": "Europe/Paris"}, "UTC")
    assert fires(trigger, "2026-03-28T12:00:00+01:00", 2, "Europe/Paris") == [
        "2026-03-29T03:00:00+02:00",
        "2026-03-30T02:30:00+02:00",
    ]
    assert fires(trigger, "2026-10-24T12:00:00+02:00", 2, "Europe/Paris") == [
        "2026-10-25T02:30:00+02:00",
        "2026-10-26T02:30:00+01:00",
    ]


def test_any_and_all_combine_triggers() -> None:
    either = parse_trigger({"any": [{"cron": "0 8 * * mon"}, {"cron": "0 9 * * sat"}]})
    assert fires(either, "2026-01-01T00:00:00+00:00", 3) == [
        "2026-01-03T09:00:00+00:00",
        "2026-01-05T08:00:00+00:00",
        "2026-01-10T09:00:00+00:00",
    ]
    both = parse_trigger({"all": [{"cron": "0 12 * * fri"}, {"cron": "0 12 13 * *"}]})
    assert fires(both, "2026-01-01T00:00:00+00:00", 2) == [
        "2026-02-13T12:00:00+00:00",  # Friday the 13th
        "2026-03-13T12:00:00+00:00",
    ]
    assert parse_trigger(either.to_dict()).description == either.description


class Counting:
    """Counts how often the wrapped cron spec is asked for a next match."""

    def __init__(self, trigger: CronTrigger) -> None:
        self.calls = 0
        inner = trigger.spec
        original = inner.next_match

        def next_match(after: datetime) -> datetime | None:
            self.calls += 1
            return original(after)

        object.__setattr__(inner, "next_match", next_match)


@pytest.mark.parametrize("tz", ["Europe/Paris", "America/New_York", "Australia/Lord_Howe"])
@pytest.mark.parametrize("expr", ["* * * * *", "30 2 * * *", "*/30 * * * *", "0,30 1-3 * * *"])
def test_cron_near_a_transition_is_a_few_steps_and_exact(tz: str, expr: str) -> None:
    trigger = CronTrigger(expr, tz)
    counter = Counting(trigger)
    zone = ZoneInfo(tz)
    for start in ("2026-03-28T18:00:00", "2026-10-24T18:00:00", "2026-04-04T12:00:00"):
        t0 = datetime.fromisoformat(start).replace(tzinfo=zone).timestamp()
        t, seen = t0, []
        counter.calls = 0
        for _ in range(200):
            nxt = trigger.next_after(t)
            assert nxt is not None and nxt > t
            seen.append(nxt)
            t = nxt
        # at most a few wall-clock matches per step, transition or not (a scan around a
        # transition took ~200 per-minute steps per call)
        assert counter.calls <= 200 * 3
        # the count of due times is arithmetic and agrees with the iteration
        assert trigger.count_between(t0, seen[-1]) == 200
        count, last, nxt = catch_up(trigger, seen[0], seen[-1] + 0.5)
        assert (count, last) == (200, seen[-1])
