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
    # environment values are text; the service's own model converts them
    assert s.services == {"scheduler": {"max_concurrency": 4, "jitter": "2"}}

    class Scheduler(BaseModel):
        max_concurrency: int
        jitter: float

    assert s.section("scheduler", Scheduler) == Scheduler(max_concurrency=4, jitter=2.0)
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


@pytest.mark.parametrize(
    "token",
    [
        "abcdefghijklmnop #not-a-comment",
        "'quoted-token-with-quotes'",
        '"double-quoted-token-value"',
        "0123456789012345",  # digits stay text
        "  spaces-around-the-token  ",
        "[not-a-list-0123456789]",
    ],
)
def test_secrets_from_the_environment_are_taken_verbatim(token: str) -> None:
    s = Settings.load(env={"XCORE_ADMIN_TOKEN": token})
    assert s.admin_token is not None
    assert s.admin_token.get_secret_value() == token


def test_null_in_the_environment_is_text_not_unset() -> None:
    # four letters: too short for a token, refused rather than silently meaning "none"
    with pytest.raises(SettingsError, match=r"'admin_token' \(from environment variable"):
        Settings.load(env={"XCORE_ADMIN_TOKEN": "null"})
    assert Settings.load(env={"XCORE_NODE": "null"}).node == "null"


def test_dotenv_secret_files_and_their_precedence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "xcore_admin_token").write_text("from-the-secret-file-0123\n")
    (secrets / "xcore_node").write_text("secret-node")
    (tmp_path / "xcore.yaml").write_text(
        f"secrets_dir: {secrets}\nnode: yaml-node\nport: 7000\nhost: 10.0.0.1\n"
    )
    (tmp_path / ".env").write_text(
        "OTHER_APP_SETTING=ignored\nXCORE_PORT=7100\nXCORE_LOG_LEVEL=debug\n"
        "XCORE_HTTP__MAX_BODY_BYTES=2048\n"
    )
    s = Settings.load(env={"XCORE_LOG_LEVEL": "error"})
    assert s.admin_token is not None
    assert s.admin_token.get_secret_value() == "from-the-secret-file-0123"  # newline dropped
    assert s.node == "secret-node"  # secret file beats the YAML file
    assert s.host == "10.0.0.1"  # YAML beats the defaults
    assert s.port == 7100  # dotenv beats the YAML file
    assert s.log_level == "ERROR"  # the environment beats dotenv
    assert s.http.max_body_bytes == 2048
    assert Settings.load(env={"XCORE_PORT": "7200"}, overrides={"port": 7300}).port == 7300


def test_bad_values_in_dotenv_and_secret_files_name_their_source(tmp_path: Path) -> None:
    env_file = tmp_path / "prod.env"
    env_file.write_text("XCORE_HTTP__MAX_CONNECTIONS=lots\n")
    with pytest.raises(
        SettingsError,
        match=rf"'http.max_connections' \(from dotenv file {env_file}, entry XCORE_HTTP__MAX_CONNECTIONS\)",
    ):
        Settings.load(env={}, dotenv=env_file)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "xcore_port").write_text("eighty")
    with pytest.raises(SettingsError, match=rf"'port' \(from secret file {secrets}/xcore_port\)"):
        Settings.load(env={}, secrets_dir=secrets)
    with pytest.raises(SettingsError, match="does not exist"):
        Settings.load(env={}, dotenv=tmp_path / "missing.env")
    with pytest.raises(SettingsError, match="not a folder"):
        Settings.load(env={"XCORE_SECRETS_DIR": str(tmp_path / "nope")})
    with pytest.raises(SettingsError, match="XCORE_HTTP__NOPE|'http.nope'"):
        Settings.load(env={"XCORE_HTTP__NOPE": "1"})


def test_a_section_reads_json_lists_from_the_environment() -> None:
    class Loader(BaseModel):
        model_config = ConfigDict(extra="forbid")
        allow: list[str] = []
        retries: int = 0

    s = Settings.load(
        env={"XCORE_SERVICES__LOADER__ALLOW": '["a", "b"]', "XCORE_SERVICES__LOADER__RETRIES": "3"}
    )
    assert s.section("loader", Loader) == Loader(allow=["a", "b"], retries=3)


def test_the_constructor_reads_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XCORE_PORT", "9999")
    assert Settings().port == 8000
    assert Settings.load().port == 9999


def test_the_test_suite_and_benchmark_knobs_are_not_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no xcore.yaml or .env here
    env = {
        "XCORE_TEST_PG_DSN": "postgresql://x@127.0.0.1:1/db",
        "XCORE_TEST_REQUIRE_BWRAP": "1",
        "XCORE_BENCH_PAIRS": "3",
        "XCORE_PORT": "8123",
    }
    assert Settings.load(env=env).port == 8123
    with pytest.raises(SettingsError, match="unknown setting 'testing'"):
        Settings.load(env={"XCORE_TESTING": "1"})
