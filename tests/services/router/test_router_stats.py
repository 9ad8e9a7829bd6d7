"""Per-plugin request statistics."""

from __future__ import annotations

import pytest

from services.router.stats import PluginStats, RouteStats


def test_counts_by_status_class_and_errors() -> None:
    stats = PluginStats("hello")
    for status in (200, 201, 204, 302, 404, 422, 500, 503):
        stats.observe(status, 0.001)
    numbers = stats.as_dict()
    assert numbers["requests"] == 8
    assert numbers["by_class"] == {"1xx": 0, "2xx": 3, "3xx": 1, "4xx": 2, "5xx": 2}
    assert numbers["errors"] == 2
    assert numbers["latency_sum_s"] == pytest.approx(0.008)


def test_buckets_are_inclusive_upper_bounds_with_an_inf_bucket() -> None:
    stats = PluginStats("hello", bounds=(0.001, 0.01))
    stats.observe(200, 0.001)  # le 0.001
    stats.observe(200, 0.005)  # le 0.01
    stats.observe(200, 99.0)  # +Inf
    assert stats.buckets == [1, 1, 1]


def test_quantiles_interpolate_inside_the_bucket() -> None:
    stats = PluginStats("hello", bounds=(0.01, 0.02, 0.04))
    assert stats.quantile(0.5) is None
    for _ in range(10):
        stats.observe(200, 0.015)  # all in (0.01, 0.02]
    assert stats.quantile(0.5) == pytest.approx(0.015)
    assert stats.quantile(0.99) == pytest.approx(0.0199)
    stats.observe(200, 1.0)  # +Inf bucket: the largest finite bound is reported
    assert stats.quantile(1.0) == pytest.approx(0.04)


def test_route_stats_keep_one_entry_per_plugin() -> None:
    stats = RouteStats()
    assert stats.plugin("a") is stats.plugin("a")
    stats.plugin("a").observe(200, 0.001)
    stats.plugin("b").observe(500, 0.001)
    snap = stats.snapshot()
    assert snap["a"]["requests"] == 1
    assert snap["b"]["errors"] == 1
    assert stats.find("c") is None


def test_bucket_bounds_must_increase() -> None:
    with pytest.raises(ValueError, match="increasing"):
        RouteStats(bounds=(0.1, 0.01))
