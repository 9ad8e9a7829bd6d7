"""Manifests: the original format, the snake_case keys, and every refusal naming the culprit."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.loader.manifest import ManifestError, parse_manifest, read_manifest

from .conftest import write_plugin


def test_original_format_is_accepted() -> None:
    m = parse_manifest(
        {
            "version": "1.0.0",
            "author": "Nom Auteur",
            "Api_prefix": "/app/plugin_name",
            "tag_for_identified": ["plugin_name"],
        },
        "plugin_name",
    )
    assert (m.version, m.author, m.prefix, m.tags) == (
        "1.0.0",
        "Nom Auteur",
        "/app/plugin_name",
        ("plugin_name",),
    )
    assert m.mode == "trusted"


def test_snake_case_and_further_keys() -> None:
    m = parse_manifest(
        {
            "name": "p",
            "version": "2.1.0-rc.1+build.5",
            "api_prefix": "/app/p/",
            "tags": "one",
            "mode": "sandboxed",
            "limits": {"memory": "256M", "cpu": "2s", "wall_time": 5, "open_files": 64},
            "requires": ["hello>=1.0", "other"],
            "auth": ["admin"],
            "description": "d",
        },
        "p",
    )
    assert m.prefix == "/app/p"
    assert m.tags == ("one",)
    assert m.limits == {"memory": 256 * 1024**2, "cpu": 2.0, "wall_time": 5.0, "open_files": 64.0}
    assert [str(r) for r in m.requires] == ["hello>=1.0", "other"]
    assert m.requires[0].allows("1.5.0") and not m.requires[0].allows("0.9.0")
    assert m.auth.scopes == ("admin",)


@pytest.mark.parametrize(
    ("info", "key", "fragment"),
    [
        ({"author": "x"}, "version", "missing"),
        ({"version": "1.0"}, "version", "not a semantic version"),
        ({"version": 1}, "version", "not a semantic version"),
        ({"version": "1.0.0", "verison": "1"}, "verison", "unknown key"),
        ({"version": "1.0.0", "Api_prefix": "/a", "api_prefix": "/b"}, "api_prefix", "given twice"),
        ({"version": "1.0.0", "api_prefix": "app"}, "api_prefix", "must start with '/'"),
        ({"version": "1.0.0", "api_prefix": "/"}, "api_prefix", "every path"),
        ({"version": "1.0.0", "api_prefix": "/a/../b"}, "api_prefix", "'..'"),
        ({"version": "1.0.0", "api_prefix": "/a//b"}, "api_prefix", "empty segment"),
        ({"version": "1.0.0", "mode": "root"}, "mode", "'trusted' or 'sandboxed'"),
        ({"version": "1.0.0", "name": "other"}, "name", "differs"),
        ({"version": "1.0.0", "requires": {"x": "~~1"}}, "requires", "not a version specifier"),
        ({"version": "1.0.0", "requires": 3}, "requires", "must be a dict"),
        ({"version": "1.0.0", "requires": ["p"]}, "requires", "require itself"),
        ({"version": "1.0.0", "limits": {"disk": 1}}, "limits.disk", "unknown limit"),
        ({"version": "1.0.0", "limits": {"memory": "lots"}}, "limits.memory", "positive"),
        ({"version": "1.0.0", "tags": [1]}, "tags", "list of strings"),
    ],
)
def test_refusals_name_plugin_file_and_key(info: dict, key: str, fragment: str) -> None:
    with pytest.raises(ManifestError) as err:
        parse_manifest(info, "p")
    assert err.value.key == key
    message = str(err.value)
    assert message.startswith("plugin 'p': run.py: ")
    assert f"key {key!r}" in message
    assert fragment in message


def test_invalid_plugin_name() -> None:
    with pytest.raises(ManifestError, match="invalid plugin name"):
        parse_manifest({"version": "1.0.0"}, "9lives")


def test_manifest_is_read_without_running_the_plugin(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    folder = write_plugin(
        tmp_path,
        "quiet",
        run=f"open({str(marker)!r}, 'w').write('x')\nraise SystemExit('must not run')\n",
    )
    m = read_manifest(folder)
    assert m.version == "1.0.0"
    assert not marker.exists()


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("VERSION = '1'\nPLUGIN_INFO = {'version': VERSION}\n", "must be a literal dict"),
        ("PLUGIN_INFO = dict(version='1.0.0')\n", "must be a literal dict"),
        ("x = 1\n", "no top-level `PLUGIN_INFO"),
        ("PLUGIN_INFO = {'version': '1.0.0'\n", "line 1"),
        ("PLUGIN_INFO = ['1.0.0']\n", "must be a dict"),
    ],
)
def test_unreadable_plugin_info(tmp_path: Path, source: str, fragment: str) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "run.py").write_text(source)
    with pytest.raises(ManifestError, match="plugin 'bad': run.py: ") as err:
        read_manifest(folder)
    assert fragment in str(err.value)


def test_missing_run_py(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="run.py: the file is missing"):
        read_manifest(tmp_path / "empty")
