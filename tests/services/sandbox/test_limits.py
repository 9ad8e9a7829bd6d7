"""Limits: the operator's defaults, a manifest's lower or higher values, the ceilings."""

from __future__ import annotations

import pytest

from services.sandbox.limits import MIB, LimitError, resolve
from services.sandbox.settings import SandboxSettings


def test_defaults_lowered_and_raised_up_to_the_ceiling() -> None:
    settings = SandboxSettings(memory_mb=512, max_memory_mb=1024, wall_time_s=10)
    assert resolve("p", settings, {}, False).memory == 512 * MIB
    lowered = resolve("p", settings, {"memory": 256 * MIB, "wall_time": 2}, False)
    assert (lowered.memory, lowered.wall_time) == (256 * MIB, 2)
    assert resolve("p", settings, {"memory": 1024 * MIB}, False).memory == 1024 * MIB
    with pytest.raises(LimitError, match=r"limits\.memory.*max_memory_mb \(1024 MiB\)"):
        resolve("p", settings, {"memory": 1025 * MIB}, False)
    with pytest.raises(LimitError, match=r"limits\.processes.*below 16"):
        resolve("p", settings, {"processes": 2}, False)


def test_network_needs_the_manifest_and_the_operator() -> None:
    closed = SandboxSettings()
    opened = SandboxSettings(allow_network=True)
    assert resolve("p", closed, {}, True).network is False
    assert resolve("p", opened, {}, False).network is False
    assert resolve("p", opened, {}, True).network is True


def test_settings_refuse_a_default_above_its_ceiling() -> None:
    with pytest.raises(ValueError, match="memory_mb"):
        SandboxSettings(memory_mb=2048, max_memory_mb=1024)
