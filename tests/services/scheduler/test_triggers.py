"""Triggers: durations, intervals, one-shots, and cron across daylight-saving changes."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from services.scheduler.triggers import (
    CronTrigger,
    IntervalTrigger,
    catch_up,
    on_grid,
    parse_at,
    parse_duration,
    parse_trigger,
)


def runs(expr: str, tz: str, start: str, n: int) -> list[str]:
    trigger = CronTrigger(expr, tz)
    zone = ZoneInfo(tz)
    t: float | None = datetime.fromisoformat(start).timestamp()
    out = []
    for _ in range(n):
        assert t is not None
        t = trigger.next_after(t)
        assert t is not None
        out.append(datetime.fromtimestamp(t, zone).isoformat())
    return out


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("10m", 600), ("1h30m", 5400), ("250ms", 0.25), (2.5, 2.5), ("7", 7)],
)
def test_durations(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "10x", "m10", "-5", -1, "1h 30q", True])
def test_bad_durations_are_refused_with_the_value(bad: object) -> None:
    with pytest.raises(ValueError, match="every"):
        parse_duration(bad, "every")  # type: ignore[arg-type]


def test_paris_spring_forward_fixed_time_runs_right_after_the_gap() -> None:
    # 2026-03-29: 02:00 -> 03:00 in Paris; 02:30 does not exist that day
    assert runs("30 2 * * *", "Europe/Paris", "2026-03-28T12:00:00+01:00", 3) == [
        "2026-03-29T03:00:00+02:00",
        "2026-03-30T02:30:00+02:00",
        "2026-03-31T02:30:00+02:00",
    ]


def test_paris_fall_back_fixed_time_runs_once() -> None:
    # 2026-10-25: 03:00 -> 02:00 in Paris; 02:30 happens twice, runs on the first pass
    assert runs("30 2 * * *", "Europe/Paris", "2026-10-24T12:00:00+02:00", 2) == [
        "2026-10-25T02:30:00+02:00",
        "2026-10-26T02:30:00+01:00",
    ]


def test_croniter_alone_would_run_the_repeated_hour_twice() -> None:
    """The correction is needed: croniter with an aware start yields both passes."""
    from croniter import croniter

    zone = ZoneInfo("Europe/Paris")
    it = croniter("30 2 * * *", datetime(2026, 10, 24, 12, tzinfo=zone))
    first, second = it.get_next(datetime), it.get_next(datetime)
    assert first.date() == second.date()  # 02:30+02:00 then 02:30+01:00


def test_wildcard_cron_keeps_both_passes_and_skips_the_gap() -> None:
    assert runs("*/30 * * * *", "Europe/Paris", "2026-10-25T01:00:00+02:00", 6) == [
        "2026-10-25T01:30:00+02:00",
        "2026-10-25T02:00:00+02:00",
        "2026-10-25T02:30:00+02:00",
        "2026-10-25T02:00:00+01:00",
        "2026-10-25T02:30:00+01:00",
        "2026-10-25T03:00:00+01:00",
    ]
    assert runs("*/30 * * * *", "Europe/Paris", "2026-03-29T01:00:00+01:00", 3) == [
        "2026-03-29T01:30:00+01:00",
        "2026-03-29T03:00:00+02:00",
        "2026-03-29T03:30:00+02:00",
    ]


def test_new_york_changes() -> None:
    # 2026-03-08 02:00 -> 03:00; two fixed times in the gap coalesce into one run
    assert runs("15,45 2 * * *", "America/New_York", "2026-03-07T12:00:00-05:00", 3) == [
        "2026-03-08T03:00:00-04:00",
        "2026-03-09T02:15:00-04:00",
        "2026-03-09T02:45:00-04:00",
    ]
    # 2026-11-01 02:00 -> 01:00; 01:30 runs once
    assert runs("30 1 * * *", "America/New_York", "2026-10-31T12:00:00-04:00", 2) == [
        "2026-11-01T01:30:00-04:00",
        "2026-11-02T01:30:00-05:00",
    ]


def test_plain_cron_in_utc() -> None:
    assert runs("*/5 * * * *", "UTC", "2026-01-01T00:00:00+00:00", 2) == [
        "2026-01-01T00:05:00+00:00",
        "2026-01-01T00:10:00+00:00",
    ]


@pytest.mark.parametrize(
    ("expr", "tz", "message"),
    [
        ("61 * * * *", None, "not a valid cron"),
        ("* * * *", None, "expected 5 fields"),
        ("*/5 * * * *", "Mars/Olympus", "unknown time zone 'Mars/Olympus'"),
    ],
)
def test_invalid_cron_and_zone(expr: str, tz: str | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CronTrigger(expr, tz)


def test_catch_up_counts_missed_interval_runs() -> None:
    count, last, nxt = catch_up(IntervalTrigger(10.0), 100.0, 135.0)
    assert (count, last, nxt) == (4, 130.0, 140.0)
    count, last, nxt = catch_up(CronTrigger("0 * * * *"), 3600.0, 3 * 3600.0 + 5)
    assert (count, last, nxt) == (3, 3 * 3600.0, 4 * 3600.0)


def test_at_naive_uses_the_zone() -> None:
    assert parse_at("2026-12-01T08:00:00+01:00", None) == parse_at(
        "2026-12-01T08:00:00", "Europe/Paris"
    )
    with pytest.raises(ValueError, match="not an ISO 8601"):
        parse_at("next tuesday", None)


def test_catch_up_after_a_month_down_is_bounded_and_exact() -> None:
    # a per-minute cron down for 30 days: cron counts are arithmetic, so exact whatever
    # the cap; the latest due time and the next one are exact (searched back from now)
    start = 1_790_000_040.0  # a whole minute
    now = start + 30 * 86400 + 59.5
    count, last, nxt = catch_up(CronTrigger("* * * * *", "Europe/Paris"), start, now, cap=50)
    assert count == 30 * 1440 + 1
    assert last == start + 30 * 86400
    assert nxt == last + 60
    # a monthly cron past the cap: the window widens until it holds a due time
    monthly = CronTrigger("0 3 1 * *", "UTC")
    first = monthly.next_after(1_700_000_000.0)
    assert first is not None
    far = first + 200 * 86400
    count, last, nxt = catch_up(monthly, first, far, cap=2)
    assert count == 7  # 200 days of a monthly cron: exact, not capped
    assert last <= far < (nxt or 0)
    assert monthly.next_after(last) == nxt


@pytest.mark.parametrize(
    "declared",
    [
        {"every": "10s"},
        {"every": "10s", "end": "2099-01-01T00:00:00Z"},
        {"any": [{"every": "10s"}, {"at": "2099-01-01T00:00:00Z"}]},
    ],
)
def test_on_grid_every_registration_gets_the_same_due_times(declared: dict[str, object]) -> None:
    trigger = parse_trigger(declared)
    grid = on_grid(trigger)
    # nodes registering at different moments: the plain trigger gives each its phase,
    # the grid gives them all the multiples of the interval
    assert trigger.first(1000.3) != trigger.first(1003.9)
    assert grid.first(1000.3) == grid.first(1003.9) == 1010.0
    assert grid.next_after(1010.0) == 1020.0
    # it reads and describes itself as declared (events and the admin API show that)
    assert grid.description == trigger.description
    assert grid.to_dict() == trigger.to_dict()


def test_on_grid_keeps_a_declared_start_and_starts_a_bounded_grid_there() -> None:
    anchored = parse_trigger({"every": "10s", "start": "2026-01-01T00:00:03Z"})
    assert on_grid(anchored) is anchored
    start = parse_at("2026-01-01T00:00:03Z", "UTC")
    bounded = on_grid(
        parse_trigger({"any": [{"every": "10s"}, {"every": "1h"}], "start": "2026-01-01T00:00:03Z"})
    )
    assert bounded.first(start + 25.0) == start + 30.0
    both = on_grid(parse_trigger({"all": [{"every": "10s"}, {"every": "5s"}]}))
    assert both.first(1000.3) == 1010.0
    cron = parse_trigger({"cron": "*/5 * * * *"})
    assert on_grid(cron) is cron


@pytest.mark.parametrize(
    ("every", "due"),
    [
        (13.37, 1608233606.84),  # stepped there, a rounding below: 1608233606.8399997
        (0.1, 1850649667.1),
        (0.03, 1700000000.01),
        (1 / 3, 1700000000.0),
        (7.0, 1700000003.0),
    ],
)
def test_a_grid_steps_one_interval_at_a_time_at_epoch_scale(every: float, due: float) -> None:
    grid = on_grid(IntervalTrigger(every))
    t = grid.first(due - 50 * every)
    assert t is not None
    for _ in range(200):
        nxt = grid.next_after(t)
        assert nxt is not None
        # never the same instant again a rounding later (two runs), never one skipped
        assert abs(nxt - t - every) < 1e-5, (t, nxt)
        # each instant is the grid's, however it was reached (every node agrees)
        assert nxt == grid.first(nxt - every / 2)
        t = nxt


@pytest.mark.parametrize(
    "declared",
    [{"every": 0.1}, {"every": 13.37}, {"every": 13.37, "end": "2099-01-01T00:00:00Z"}],
)
@pytest.mark.parametrize("since", [1850649663.5, 1608233459.77, 1680472224.9])
def test_catch_up_on_a_grid_counts_the_instants_the_trigger_gives(
    declared: dict[str, object], since: float
) -> None:
    grid = on_grid(parse_trigger(declared))
    due = grid.first(since)
    assert due is not None
    for late in (0.3, 3.7, 24.1, 311.0):
        now = due + late * float(declared["every"])  # type: ignore[arg-type]
        count, t, nxt = 1, due, grid.next_after(due)
        while nxt is not None and nxt <= now:
            count, t, nxt = count + 1, nxt, grid.next_after(nxt)
        assert catch_up(grid, due, now) == (count, t, nxt)
