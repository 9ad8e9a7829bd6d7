"""One odd plugin never stops the boot, wedges the loader or goes unreported.

Every case is a real plugin folder on disk in a real kernel: odd files at each stage
(manifest, config, digest, import), endless imports and hooks, a hook that blocks the
event loop. Endless loops end on a flag file at the end of the test, so no thread
outlives it.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import anyio
import pytest

from .conftest import AUTH, status_router, write_plugin


def _fifo(path: Path) -> None:
    os.mkfifo(path)


async def test_odd_plugins_fail_alone_at_boot(harness_factory, plugins: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="xcore.loader")
    write_plugin(plugins, "good", router=status_router())
    # a stray FIFO and an undecodable file name beside the code: never opened, no harm
    _fifo(write_plugin(plugins, "piped", router=status_router()) / "pipe")
    (plugins / "piped" / os.fsdecode(b"caf\xe9.txt")).write_bytes(b"x")
    # the manifest stage: run.py too large, run.py a FIFO
    huge = write_plugin(plugins, "huge")
    (huge / "run.py").write_bytes(b"PLUGIN_INFO = {'version': '1.0.0'}\n" + b"#" * (9 << 20))
    fiforun = write_plugin(plugins, "fiforun")
    (fiforun / "run.py").unlink()
    _fifo(fiforun / "run.py")
    # the config stage: YAML nested 10,000 levels, config.yaml a FIFO
    write_plugin(plugins, "deepyaml", config="[" * 10_000 + "]" * 10_000 + "\n")
    _fifo(write_plugin(plugins, "fifoconf") / "config.yaml")
    # an expression too deep to parse: in run.py (manifest), in a helper (import)
    deep = "X = " + "+".join(["1"] * 5_000) + "\n"
    write_plugin(plugins, "deeprun", run=deep)
    write_plugin(plugins, "deep", run="from . import helper\n", files={"helper.py": deep})
    # a folder whose name is not UTF-8
    (plugins / os.fsdecode(b"bad\xffname")).mkdir()
    (plugins / os.fsdecode(b"bad\xffname") / "run.py").write_text("PLUGIN_INFO = {}\n")

    # The nesting bound is the loader's own: a raised recursion limit (hypothesis, a
    # debugger or the host application may raise it) must not let a deep file through.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(100_000)
    try:
        with anyio.fail_after(60):
            h = await harness_factory()
    finally:
        sys.setrecursionlimit(limit)
    assert h.kernel.started
    assert (await h.client.get("/app/good/status")).status_code == 200
    assert (await h.client.get("/app/piped/status")).status_code == 200
    failed = {r.data["name"]: r.data for r in await h.events("PluginLoadFailed")}
    expected = {"huge", "fiforun", "deepyaml", "fifoconf", "deep", "deeprun"}
    assert set(failed) == expected, {n: failed[n]["traceback"] for n in set(failed) - expected}
    assert (
        failed["huge"]["stage"] == "manifest" and "more than the limit" in failed["huge"]["error"]
    )
    assert failed["fiforun"]["stage"] == "manifest" and "a FIFO" in failed["fiforun"]["error"]
    assert failed["fiforun"]["file"] == "run.py"
    assert failed["deepyaml"]["stage"] == "config"
    assert "nested 10000 levels deep" in failed["deepyaml"]["error"]
    assert failed["deepyaml"]["file"] == "config.yaml"
    assert failed["fifoconf"]["stage"] == "config" and "a FIFO" in failed["fifoconf"]["error"]
    assert failed["deeprun"]["stage"] == "manifest"
    assert "nested more than 1000 levels deep" in failed["deeprun"]["error"]
    assert failed["deep"]["stage"] == "import"
    assert "nested more than 1000 levels deep" in failed["deep"]["error"]
    assert failed["deep"]["file"] == "run.py" and failed["deep"]["line"] == 2
    assert h.table.rows["huge"]["last_error"]["stage"] == "manifest"
    # every failure is logged at ERROR where the person running the server looks
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    for name in failed:
        assert any(f"plugin {name!r}" in m and "failed at stage" in m for m in errors), name
    assert any("bad\\xffname" in m and "not valid UTF-8" in m for m in errors)
    assert any("plugin 'good': generation 1 loaded" in r.getMessage() for r in caplog.records)


async def test_odd_plugin_at_runtime_is_answered_at_once(harness_factory, plugins: Path) -> None:
    write_plugin(plugins, "good", router=status_router())
    h = await harness_factory()
    _fifo(write_plugin(plugins, "odd") / "config.yaml")
    with anyio.fail_after(20):
        r = await h.client.post("/admin/plugins/odd/reload", headers=AUTH)
    assert r.status_code == 422
    body = r.json()
    assert body["outcome"] == "PluginReloadFailed" and body["stage"] == "config"
    assert body["file"] == "config.yaml" and "a FIFO" in body["error"]
    assert h.table.rows["odd"]["last_error"]["stage"] == "config"
    # the loader is free: the next requests are answered too
    with anyio.fail_after(20):
        again = await h.client.post("/admin/plugins/good/reload", headers=AUTH)
        assert again.status_code == 200
        assert (await h.client.get("/admin/plugins", headers=AUTH)).status_code == 200
    assert await h.events("SubscriberFailed") == []


async def test_an_unexpected_loader_error_is_the_requests_answer(
    harness_factory, plugins: Path, monkeypatch
) -> None:
    write_plugin(plugins, "good", router=status_router())
    h = await harness_factory()

    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug in the loader")

    monkeypatch.setattr(h.loader, "reload", broken)
    with anyio.fail_after(20):
        r = await h.client.post("/admin/plugins/good/reload", headers=AUTH)
    assert r.status_code == 422
    assert r.json()["stage"] == "internal" and "a bug in the loader" in r.json()["error"]
    assert await h.events("SubscriberFailed") == []


def _spin_until(flag: Path) -> str:
    # a busy loop that ends when the test is done with it
    return f"import os\nwhile not os.path.exists({str(flag)!r}):\n    pass\n"


async def test_endless_import_is_bounded_and_reported(
    harness_factory, plugins: Path, tmp_path: Path
) -> None:
    flag = tmp_path / "stop-spinning"
    write_plugin(plugins, "good", router=status_router())
    write_plugin(plugins, "spin", run=_spin_until(flag))
    try:
        with anyio.fail_after(60):
            h = await harness_factory(loader={"import_timeout": 3})
        failed = {r.data["name"]: r.data for r in await h.events("PluginLoadFailed")}
        assert failed["spin"]["stage"] == "import"
        assert "import did not finish in 3 s" in failed["spin"]["error"]
        assert (await h.client.get("/app/good/status")).status_code == 200
        health = await h.client.get("/health", headers=AUTH)
        assert health.status_code == 503 and "loader" in health.json()["failing"]
        stuck = health.json()["components"]["loader"]["stuck_threads"]
        assert [(s["plugin"], s["what"]) for s in stuck] == [("spin", "import")]
        row = (await h.client.get("/admin/plugins/spin", headers=AUTH)).json()
        assert row["status"] == "failed" and row["stuck_threads"][0]["what"] == "import"
        # the loader moved on: a reload of another plugin is answered
        with anyio.fail_after(20):
            r = await h.client.post("/admin/plugins/good/reload", headers=AUTH)
        assert r.status_code == 200
    finally:
        flag.touch()
    with anyio.fail_after(20):  # the thread ended on its own: no longer reported
        while h.loader.threads.stuck:
            await anyio.sleep(0.05)
    assert (await h.client.get("/health", headers=AUTH)).status_code == 200


async def test_endless_sync_hook_is_bounded_and_reported(
    harness_factory, plugins: Path, tmp_path: Path
) -> None:
    flag = tmp_path / "stop-spinning"
    body = _spin_until(flag).replace("\n", "\n    ")
    write_plugin(plugins, "hooked", run=f"def on_load(ctx):\n    {body}\n")
    try:
        with anyio.fail_after(60):
            h = await harness_factory(loader={"hook_timeout": 0.5})
        failed = {r.data["name"]: r.data for r in await h.events("PluginLoadFailed")}
        assert failed["hooked"]["stage"] == "hook"
        assert "on_load did not finish within 0.5s" in failed["hooked"]["error"]
        assert "keeps running" in failed["hooked"]["error"]
        assert [s.what for s in h.loader.threads.stuck] == ["on_load"]
    finally:
        flag.touch()


async def test_a_hook_blocking_the_loop_is_named_and_recorded(
    harness_factory, plugins: Path
) -> None:
    write_plugin(
        plugins,
        "blocker",
        run="""
            import time

            async def on_load(ctx):
                time.sleep(1.5)  # blocks the event loop: never do this
            """,
    )
    with anyio.fail_after(60):
        h = await harness_factory(loop_block_threshold=0.2)
    # (a loaded machine may block the loop elsewhere too: look for the plugin's block)
    with anyio.fail_after(20):
        while True:
            blocks = [r.data for r in await h.events("LoopBlocked")]
            mine = [b for b in blocks if b["plugin"] == "blocker"]
            if mine:
                break
            await anyio.sleep(0.05)
    block = mine[0]
    assert block["plugin"] == "blocker" and block["file"] == "run.py" and block["line"] == 6
    assert block["duration_ms"] >= 200 and "time.sleep(1.5)" in block["stack"]
    health = (await h.client.get("/health", headers=AUTH)).json()["components"]["event_loop"]
    assert health["blocked_count"] >= 1 and health["last_block"] is not None


@pytest.mark.skipif(sys.platform == "win32", reason="FIFOs")
async def test_digest_never_opens_special_files(tmp_path: Path) -> None:
    from services.loader import installer

    folder = write_plugin(tmp_path, "p")
    _fifo(folder / "pipe")
    with anyio.fail_after(10):
        first = await anyio.to_thread.run_sync(installer.digest, folder)
    (folder / "run.py").write_text("PLUGIN_INFO = {'version': '1.0.1'}\n")
    assert installer.digest(folder) != first
