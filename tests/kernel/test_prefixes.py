"""The prefix rule: how the manifest's prefix and the router's own prefix combine."""

from __future__ import annotations

import pytest

from kernel.prefixes import (
    MountPoint,
    PrefixError,
    mount_point,
    normalize_prefix,
    overlaps,
    under,
)


def test_seed_example_router_prefix_is_not_doubled() -> None:
    # PLUGIN_INFO "Api_prefix": "/app/plugin_name" + APIRouter(prefix="/plugin_name")
    assert mount_point("/app/plugin_name", "/plugin_name") == MountPoint(
        prefix="/app/plugin_name", root="/app"
    )


def test_router_prefix_equal_to_the_manifest_prefix_is_not_doubled() -> None:
    assert mount_point("/app/plugin_name", "/app/plugin_name") == MountPoint(
        prefix="/app/plugin_name", root=""
    )


def test_other_router_prefix_is_kept_below_the_mount_prefix() -> None:
    assert mount_point("/app/plugin_name", "/v1") == MountPoint(
        prefix="/app/plugin_name", root="/app/plugin_name"
    )


def test_suffix_must_match_whole_segments() -> None:
    # "/app/xplugin_name" does not end with the segment "/plugin_name"
    assert mount_point("/app/xplugin_name", "/plugin_name").root == "/app/xplugin_name"


def test_router_without_prefix_uses_the_manifest_prefix() -> None:
    assert mount_point("/app/hello", "") == MountPoint(prefix="/app/hello", root="/app/hello")
    assert mount_point("/app/hello", None) == MountPoint(prefix="/app/hello", root="/app/hello")


def test_manifest_without_prefix_uses_the_router_prefix() -> None:
    assert mount_point(None, "/hello") == MountPoint(prefix="/hello", root="")


def test_no_prefix_at_all_is_refused() -> None:
    with pytest.raises(PrefixError, match="api_prefix"):
        mount_point(None, "")


def test_trailing_slash_is_dropped() -> None:
    assert normalize_prefix("/app/hello/") == "/app/hello"
    assert mount_point("/app/hello/", "/hello/") == MountPoint(prefix="/app/hello", root="/app")


@pytest.mark.parametrize(
    ("prefix", "message"),
    [
        ("/", "every path"),
        ("app", "must start with '/'"),
        ("", "must start with '/'"),
        ("/app//x", "empty segment"),
        ("/app/../admin", "'..' segment"),
        ("/app/{tenant}", "'{tenant}'"),
        ("/app/a b", "'a b'"),
    ],
)
def test_bad_prefixes_are_refused_with_the_reason(prefix: str, message: str) -> None:
    with pytest.raises(PrefixError, match=message.replace("{", r"\{").replace("}", r"\}")):
        normalize_prefix(prefix)


def test_under_and_overlaps_respect_segment_boundaries() -> None:
    assert under("/app/hello", "/app/hello")
    assert under("/app/hello/status", "/app/hello")
    assert not under("/app/hellox", "/app/hello")
    assert not under("/app", "/app/hello")
    assert overlaps("/app", "/app/hello")
    assert overlaps("/app/hello", "/app")
    assert overlaps("/app/hello", "/app/hello")
    assert not overlaps("/app/hello", "/app/hellox")
