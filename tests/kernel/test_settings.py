"""Settings: defaults, file, environment, command line; bad values named with their source."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from kernel import Settings, SettingsError


def test_defaults_work_with_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = Settings.load(env={})
    assert s.data_dir == Path("var")
    assert s.plugins_dir == Path("plugins")
    assert s.database_path == Path("var/events.db")
    assert s.synchronous == "FULL"
    assert (s.host, s.port) == ("127.0.0.1", 8000)


def test_file_then_environment_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "xcore.yaml"
    f.write_text("port: 9000\nlog_level: debug\nservices:\n  scheduler:\n    max_concurrency: 4\n")
    s = Settings.load(f, env={"XCORE_PORT": "9100", "XCORE_SERVICES__SCHEDULER__JITTER": "2"})
    assert s.port == 9100
    assert s.log_level == "DEBUG"
    assert s.services == {"scheduler": {"max_concurrency": 4, "jitter": 2}}
    s = Settings.load(f, env={"XCORE_PORT": "9100"}, overrides={"port": 9200, "host": None})
    assert s.port == 9200
    assert s.host == "127.0.0.1"


def test_xcore_yaml_in_the_working_directory_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "xcore.yaml").write_text("synchronous: NORMAL\n")
    assert Settings.load(env={}).synchronous == "NORMAL"


def test_a_bad_value_names_the_key_and_its_source(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"'port' \(from environment variable XCORE_PORT\)"):
        Settings.load(env={"XCORE_PORT": "eighty"})
    f = tmp_path / "xcore.yaml"
    f.write_text("synchronous: SOMETIMES\n")
    with pytest.raises(SettingsError, match=rf"'synchronous' \(from file {f}\)"):
        Settings.load(f, env={})


def test_unknown_keys_are_refused(tmp_path: Path) -> None:
    f = tmp_path / "xcore.yaml"
    f.write_text("prot: 80\n")
    with pytest.raises(SettingsError, match="'prot'.*unknown setting"):
        Settings.load(f, env={})
    with pytest.raises(SettingsError, match="XCORE_DATADIR"):
        Settings.load(env={"XCORE_DATADIR": "/tmp"})


def test_invalid_yaml_and_missing_file_name_the_file(tmp_path: Path) -> None:
    f = tmp_path / "xcore.yaml"
    f.write_text("port: [unclosed\n")
    with pytest.raises(SettingsError, match=f"{f} is not valid YAML"):
        Settings.load(f, env={})
    with pytest.raises(SettingsError, match="does not exist"):
        Settings.load(tmp_path / "nope.yaml", env={})
    f.write_text("- a\n- b\n")
    with pytest.raises(SettingsError, match="mapping"):
        Settings.load(f, env={})


def test_a_service_section_is_validated_with_its_key_named() -> None:
    class SchedulerSettings(BaseModel):
        model_config = ConfigDict(extra="forbid")
        max_concurrency: int = 8

    s = Settings(services={"scheduler": {"max_concurrency": "many"}})
    with pytest.raises(SettingsError, match="'services.scheduler.max_concurrency'"):
        s.section("scheduler", SchedulerSettings)
    assert Settings().section("scheduler", SchedulerSettings).max_concurrency == 8


def test_a_short_admin_token_is_refused_and_a_good_one_is_redacted() -> None:
    import logging

    from kernel.logging import TextFormatter

    with pytest.raises(SettingsError, match=r"'admin_token' \(from environment variable"):
        Settings.load(env={"XCORE_ADMIN_TOKEN": "short"})
    Settings.load(env={"XCORE_ADMIN_TOKEN": "a-long-enough-token-123"})
    record = logging.LogRecord("x", 20, "", 0, "token a-long-enough-token-123", None, None)
    assert "a-long-enough-token-123" not in TextFormatter().format(record)
