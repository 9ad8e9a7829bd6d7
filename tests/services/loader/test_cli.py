"""``xcore plugin ...`` as a user runs it: real subprocesses, a real plugins folder and log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .conftest import write_plugin


def xcore(cwd: Path, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    """``xcore plugin ARGS`` in ``cwd``, with ``settings`` as ``XCORE_*`` variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("XCORE_")}
    env["XCORE_PORT"] = "9"  # nothing listens there: commands go offline or say so
    env.update({f"XCORE_{k.upper()}": v for k, v in settings.items()})
    return subprocess.run(
        [sys.executable, "-m", "kernel.cli", "plugin", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_new_scaffolds_a_valid_plugin(tmp_path: Path) -> None:
    out = xcore(tmp_path, "new", "demo")
    assert out.returncode == 0, out.stderr
    folder = tmp_path / "plugins" / "demo"
    assert {p.name for p in folder.iterdir()} >= {
        "__init__.py",
        "run.py",
        "router.py",
        "config.yaml",
    }
    ok = xcore(tmp_path, "validate", str(folder))
    assert ok.returncode == 0 and "ok: demo 0.1.0" in ok.stdout
    again = xcore(tmp_path, "new", "demo")
    assert again.returncode == 1 and "already exists" in again.stderr
    bad = xcore(tmp_path, "new", "9bad")
    assert bad.returncode == 1 and "not a valid plugin name" in bad.stderr


def test_validate_names_the_culprit(tmp_path: Path) -> None:
    folder = write_plugin(tmp_path, "broken", info={"version": "1.0.0", "Api_prefx": "/x"})
    out = xcore(tmp_path, "validate", str(folder))
    assert out.returncode == 1
    assert "plugin 'broken': run.py: key 'Api_prefx': unknown key" in out.stderr
    folder = write_plugin(tmp_path, "syntax", files={"util.py": "def f(:\n"})
    out = xcore(tmp_path, "validate", str(folder))
    assert out.returncode == 1 and "plugin 'syntax': util.py: line 1" in out.stderr


def test_offline_install_list_uninstall(tmp_path: Path) -> None:
    src = write_plugin(tmp_path / "src", "offline")
    out = xcore(tmp_path, "install", str(src))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "plugins" / "offline" / "run.py").exists()
    listed = xcore(tmp_path, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows["offline"]["version"] == "1.0.0" and rows["offline"]["installed"] is True
    out = xcore(tmp_path, "uninstall", "offline")
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "plugins" / "offline").exists()
    rows = {r["name"] for r in json.loads(xcore(tmp_path, "list", "--json").stdout)}
    assert "offline" not in rows


def test_reload_needs_a_server(tmp_path: Path) -> None:
    out = xcore(tmp_path, "reload", "hello")
    assert out.returncode == 1 and "no xcore server answers at http://127.0.0.1:9" in out.stderr


def test_offline_list_shows_the_versions_on_disk(tmp_path: Path) -> None:
    write_plugin(tmp_path / "plugins", "copied", info={"version": "2.3.4"})
    listed = xcore(tmp_path, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows["copied"]["version"] == "2.3.4"
    text = xcore(tmp_path, "list")
    assert "v2.3.4" in text.stdout


def test_validate_refuses_an_unreadable_archive_without_a_traceback(tmp_path: Path) -> None:
    from .test_install_refusals import bad_crc_zip

    out = xcore(tmp_path, "validate", str(bad_crc_zip(tmp_path / "arch.zip")))
    assert out.returncode == 1
    assert "member 'arch/data.txt'" in out.stderr and "Traceback" not in out.stderr


def test_cli_tells_a_wrong_token_from_a_missing_one(tmp_path: Path) -> None:
    from tests.e2e.server import serve

    token = "cli-admin-token-0123456789"
    with serve(tmp_path, env={"XCORE_ADMIN_TOKEN": token}, args=("--no-reload",)) as server:
        missing = xcore(tmp_path, "list", "--url", server.url)
        assert missing.returncode == 1 and "no admin token was given" in missing.stderr
        wrong = xcore(tmp_path, "list", "--url", server.url, "--token", "x" * 20)
        assert wrong.returncode == 1 and "refused the admin token" in wrong.stderr
        right = xcore(tmp_path, "list", "--url", server.url, "--token", token)
        assert right.returncode == 0, right.stderr
