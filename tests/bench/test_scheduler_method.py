"""The 10,000-schedule benchmark's split of its bursts by the host's slow windows
(bench/scheduler.py): a burst counts as met by a slow machine only when a slow window
overlaps its way (from ``max_lead_ms`` before its instant to its last start); the other
bursts' runs make the p99 outside the slow windows."""

from __future__ import annotations

from bench.scheduler import WAY_10K, _by_machine


def test_a_burst_is_met_by_a_slow_machine_only_when_the_window_overlaps_its_way() -> None:
    # bursts of 100 runs due at 10.0, 11.0 and 12.0; the one at 11.0 late as a whole
    late = [(10.0, 0.001 + i * 1e-5) for i in range(100)]
    late += [(11.0, 0.030 + i * 1e-5) for i in range(100)]
    late += [(12.0, 0.002 + i * 1e-5) for i in range(100)]
    # a slow window inside the way of the burst at 11.0 (before its instant)
    out = _by_machine(late, [(11.0 - WAY_10K / 2, 11.0 - WAY_10K / 4)])
    assert out["late_bursts"] == 1
    assert out["bursts_in_slow_machine"] == 1
    assert out["late_bursts_in_slow_machine"] == 1
    assert out["p99_outside_slow_machine_ms"] < 3
    # a window before any burst's way meets none: the late burst counts in the p99
    out = _by_machine(late, [(10.5, 10.6)])
    assert out["bursts_in_slow_machine"] == 0
    assert out["late_bursts_in_slow_machine"] == 0
    assert out["p99_outside_slow_machine_ms"] > 29
