"""A plugin name is matched in full: a trailing newline (``$`` accepts one) is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.loader import installer
from services.loader.manifest import valid_name

LIMITS = installer.Limits(max_bytes=100_000, max_files=50)


@pytest.mark.parametrize("name", ["evil\n", "evil\r\n", "\nevil", "ev il", "evil/x", "", "1x"])
def test_names_with_anything_else_are_refused(name: str) -> None:
    assert not valid_name(name)


def test_good_names_pass() -> None:
    assert valid_name("hello") and valid_name("a_1") and valid_name("X" * 64)
    assert not valid_name("X" * 65)


def test_the_installer_refuses_a_declared_name_with_a_newline(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    src = tmp_path / "src"
    src.mkdir()
    (src / "run.py").write_text(
        "PLUGIN_INFO = {'name': 'evil\\n', 'version': '1.0.0', 'api_prefix': '/app/evil'}\n"
    )
    with pytest.raises(installer.InstallError, match=r"'evil\\n' is not a valid plugin name"):
        installer.stage(src, plugins, LIMITS)
    assert sorted(p.name for p in plugins.rglob("*") if "\n" in p.name) == []
    with pytest.raises(installer.InstallError, match="not a valid plugin name"):
        installer.stage(src, plugins, LIMITS, name="evil\n")
