"""Choosing the PostgreSQL store: settings, environment, the command line; node ids."""

from __future__ import annotations

import os
import socket

import pytest

from kernel import Settings, SettingsError
from kernel.cli import build_parser, load_settings
from kernel.kernel import store_from_settings
from kernel.store.postgres import PostgresStore

DSN = "postgresql://ada:pa55-w0rd@db:5432/xcore"


def test_postgres_is_chosen_by_settings_or_environment() -> None:
    s = Settings.load(env={"XCORE_STORE": "postgres", "XCORE_DSN": DSN, "XCORE_NODE": "n1"})
    store = store_from_settings(s)
    assert isinstance(store, PostgresStore)
    assert store.location == "postgresql://ada:***@db:5432/xcore"
    assert store.scope == "n1"  # checkpoints are this node's
    with pytest.raises(SettingsError, match="needs a dsn"):
        Settings.load(env={"XCORE_STORE": "postgres"})


def test_the_dsn_flag_implies_postgres(monkeypatch: pytest.MonkeyPatch) -> None:
    # the command line reads the real environment: no stray XCORE_ variable of the run
    for key in [k for k in os.environ if k.startswith("XCORE_")]:
        monkeypatch.delenv(key)
    args = build_parser().parse_args(["serve", "--dsn", DSN, "--node", "web-1"])
    s = load_settings(args)
    assert (s.store, s.node) == ("postgres", "web-1")
    assert s.dsn is not None and s.dsn.get_secret_value() == DSN
    assert "pa55-w0rd" not in repr(s)


def test_the_node_id_defaults_to_host_and_port() -> None:
    assert Settings(port=8123).node == f"{socket.gethostname()}:8123"
    assert Settings(port=8123, node="web-2").node == "web-2"
