"""Queued loader requests are accepted (202), followed to their outcome, and merged.

A real ``xcore serve``: the plugin ``slow`` blocks its own import while a file the test
holds exists, so every request behind its reload waits in the loader's queue for as
long as the test wants — no timing is assumed. Behind it: a reload of ``quick`` (asked
twice: one request), a reload of ``fragile`` whose router no longer parses, an install
uploaded by the CLI, an uninstall; then the test lets ``slow`` go and follows each to its outcome,
over HTTP and with ``xcore plugin ... --wait``. After a restart the outcomes still read
from the log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import httpx

from .server import Server, serve

TOKEN = "e2e-reload-queue-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ENV = {
    "XCORE_ADMIN_TOKEN": TOKEN,
    # the CLI's requests wait this long before the server answers 202
    "XCORE_SERVICES__LOADER__ADMIN_WAIT": "1",
    # the held import is released by the test, never by this timeout
    "XCORE_SERVICES__LOADER__IMPORT_TIMEOUT": "600",
}
GOOD_ROUTER = """
from fastapi import APIRouter
router = APIRouter()

@router.get("/status")
async def status():
    return {"ok": True}
"""


def plugin(plugins: Path, name: str, run: str = "", router: str = GOOD_ROUTER) -> Path:
    folder = plugins / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "__init__.py").write_text("")
    info = {"version": "1.0.0", "api_prefix": f"/app/{name}"}
    (folder / "run.py").write_text(f"PLUGIN_INFO = {info!r}\n" + textwrap.dedent(run))
    (folder / "router.py").write_text(textwrap.dedent(router))
    return folder


def held(hold: Path) -> str:
    """A ``run.py`` body whose import waits while the file ``hold`` exists."""
    return f"""
    import pathlib, time
    while pathlib.Path({str(hold)!r}).exists():
        time.sleep(0.01)
    """


class Cli:
    """``xcore plugin ARGS`` in a subprocess, its output in files (read while it runs)."""

    def __init__(self, server: Server, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("XCORE_")}
        env.update(ENV)
        folder = server.data_dir.parent
        n = len(list(folder.glob("cli-*.out")))
        self.out, self.err = folder / f"cli-{n}.out", folder / f"cli-{n}.err"
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kernel.cli", "plugin", *args, "--url", server.url],
                stdout=out,
                stderr=err,
                env=env,
                cwd=folder,
            )

    async def says(self, text: str) -> None:
        """Wait until its stderr shows ``text`` (or it ended)."""
        while text not in self.err.read_text() and self.proc.poll() is None:
            await anyio.sleep(0.05)

    async def finish(self) -> tuple[int, str, str]:
        code = await anyio.to_thread.run_sync(self.proc.wait)
        return code, self.out.read_text(), self.err.read_text()


async def until(client: httpx.AsyncClient, url: str, *states: str) -> dict[str, object]:
    while True:
        body: dict[str, object] = (await client.get(url, headers=AUTH)).json()
        if body["status"] in states:
            return body
        await anyio.sleep(0.02)


async def test_queued_requests_are_accepted_followed_and_merged(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    hold = tmp_path / "hold"
    plugin(
        plugins,
        "slow",
        run=held(hold),
    )
    plugin(plugins, "quick")
    plugin(plugins, "gone")
    fragile = plugin(plugins, "fragile")
    extra = plugin(tmp_path / "elsewhere", "extra")
    with serve(tmp_path, plugins_dir=plugins, env=ENV, args=("--no-reload",)) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            with anyio.fail_after(240):
                hold.touch()
                r = await client.post("/admin/plugins/slow/reload?wait=0", headers=AUTH)
                assert r.status_code == 202, r.text
                slow = r.json()
                assert slow["status"] in ("queued", "running") and slow["url"].endswith(
                    f"/requests/{slow['id']}"
                )
                assert r.headers["location"] == slow["url"]
                await until(client, slow["url"], "running")

                # queued behind it: 202 with the place in line and a URL
                r = await client.post("/admin/plugins/quick/reload?wait=0", headers=AUTH)
                assert r.status_code == 202, r.text
                quick = r.json()
                assert (quick["status"], quick["queue_position"], quick["merged"]) == (
                    "queued",
                    1,
                    False,
                )
                # the same reload again joins it: same id, not queued twice
                r = await client.post("/admin/plugins/quick/reload?wait=0", headers=AUTH)
                assert r.status_code == 202 and r.json()["id"] == quick["id"]
                assert r.json()["merged"] is True

                (fragile / "router.py").write_text("from fastapi import APIRouter\nrouter = (\n")
                r = await client.post("/admin/plugins/fragile/reload?wait=0", headers=AUTH)
                broken = r.json()
                assert r.status_code == 202 and broken["queue_position"] == 2, broken

                line = (await client.get("/admin/loader/requests", headers=AUTH)).json()
                assert line["running"]["id"] == slow["id"]
                assert [q["id"] for q in line["queued"]] == [quick["id"], broken["id"]]
                assert [q["queue_position"] for q in line["queued"]] == [1, 2]
                one = (await client.get(quick["url"], headers=AUTH)).json()
                assert (one["status"], one["queue_position"]) == ("queued", 1)

                # the CLI: without --wait it says "accepted" and exits 0 (joining the
                # queued reload); with --wait it follows to the outcome
                code, out, err = await Cli(server, "reload", "quick").finish()
                assert code == 0, err
                assert f"accepted, position 1: request {quick['id']}" in out
                assert "joined a reload already queued" in out
                code, out, err = await Cli(server, "install", str(extra)).finish()
                assert code == 0, err
                assert "accepted, position 3" in out, out
                install_id = int(out.split("request ")[1].split()[0])
                r = await client.delete("/admin/plugins/gone?wait=0", headers=AUTH)
                gone = r.json()
                assert r.status_code == 202 and gone["queue_position"] == 4, gone
                # a reload of the plugin being reloaded is not merged into the running one
                # (its files may have changed since that one read them): it queues
                r = await client.post("/admin/plugins/slow/reload?wait=0", headers=AUTH)
                slow_again = r.json()
                assert r.status_code == 202 and slow_again["id"] != slow["id"], slow_again
                assert (slow_again["queue_position"], slow_again["merged"]) == (5, False)
                waiting_ok = Cli(server, "reload", "quick", "--wait")
                waiting_bad = Cli(server, "reload", "fragile", "--wait")
                # both are accepted (202 after the server's admin wait, joining the
                # queued reloads) before the held import is let go: nothing ran yet
                await waiting_ok.says(f"request {quick['id']}: queued, position 1")
                await waiting_bad.says(f"request {broken['id']}: queued, position 2")
                assert waiting_ok.proc.poll() is None and waiting_bad.proc.poll() is None
                hold.unlink()

                code, out, err = await waiting_ok.finish()
                assert code == 0, err
                assert '"status": "succeeded"' in out and f"request {quick['id']}" in err
                code, out, err = await waiting_bad.finish()
                assert code == 1, (out, err)
                assert "[import] router.py:2" in err, err

                done = (await client.get(quick["url"], headers=AUTH)).json()
                assert (done["status"], done["outcome"], done["generation"]) == (
                    "succeeded",
                    "PluginReloaded",
                    2,  # one reload: the three asks were one request
                )
                failed = (await client.get(broken["url"], headers=AUTH)).json()
                assert (failed["status"], failed["stage"], failed["file"]) == (
                    "failed",
                    "import",
                    "router.py",
                )
                assert failed["error"]
                installed = (
                    await client.get(f"/admin/loader/requests/{install_id}", headers=AUTH)
                ).json()
                assert installed["status"] == "succeeded", installed
                code, out, err = await Cli(server, "request", str(install_id)).finish()
                assert code == 0 and '"outcome": "PluginReloaded"' in out, (out, err)
                code, out, err = await Cli(server, "request", str(broken["id"])).finish()
                assert code == 1 and "[import] router.py:2" in err, (out, err)
                assert (await client.get("/app/extra/status")).json() == {"ok": True}
                assert not any((server.data_dir / "uploads").iterdir())
                removed = (await client.get(gone["url"], headers=AUTH)).json()
                assert (removed["status"], removed["outcome"]) == ("succeeded", "PluginUninstalled")
                assert not (plugins / "gone").exists()
                for asked, generation in ((slow, 2), (slow_again, 3)):
                    ran = await until(client, str(asked["url"]), "succeeded", "failed")
                    assert (ran["status"], ran["generation"]) == ("succeeded", generation)

                # a request that fails fast is answered with its failure at once
                r = await client.post("/admin/plugins/fragile/reload?wait=120", headers=AUTH)
                assert r.status_code == 422 and r.json()["stage"] == "import", r.text
                assert r.json()["status"] == "failed" and "router.py" in r.text
                missing = await client.get("/admin/loader/requests/999999", headers=AUTH)
                assert missing.status_code == 404
                outcome_url = f"/admin/loader/requests/{done['outcome_position']}"
                assert (await client.get(outcome_url, headers=AUTH)).status_code == 404
    # the outcomes are read from the log: they survive a restart
    with serve(tmp_path, plugins_dir=plugins, env=ENV, args=("--no-reload",)) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            with anyio.fail_after(60):
                again = (await client.get(broken["url"], headers=AUTH)).json()
                assert (again["status"], again["stage"], again["file"]) == (
                    "failed",
                    "import",
                    "router.py",
                )
                ok = (await client.get(quick["url"], headers=AUTH)).json()
                assert ok["status"] == "succeeded"


async def test_a_request_with_nothing_to_do_reads_succeeded_after_a_restart(
    tmp_path: Path,
) -> None:
    """A disable queued behind an uninstall of the same plugin finds it gone: nothing to
    change. It succeeded, and still reads so after a restart (not ``abandoned``)."""
    plugins = tmp_path / "plugins"
    hold = tmp_path / "hold"
    plugin(
        plugins,
        "slow",
        run=held(hold),
    )
    plugin(plugins, "quick")
    with serve(tmp_path, plugins_dir=plugins, env=ENV, args=("--no-reload",)) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            with anyio.fail_after(120):
                hold.touch()
                r = await client.post("/admin/plugins/slow/reload?wait=0", headers=AUTH)
                await until(client, r.json()["url"], "running")
                r = await client.delete("/admin/plugins/quick?wait=0", headers=AUTH)
                assert r.status_code == 202, r.text
                r = await client.post("/admin/plugins/quick/disable?wait=0", headers=AUTH)
                assert r.status_code == 202, r.text
                disable = r.json()
                hold.unlink()
                done = await until(client, disable["url"], "succeeded", "failed")
                assert done["status"] == "succeeded", done
    with serve(tmp_path, plugins_dir=plugins, env=ENV, args=("--no-reload",)) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            with anyio.fail_after(60):
                again = (await client.get(disable["url"], headers=AUTH)).json()
                assert again["status"] == "succeeded", again
                assert again["detail"] == "nothing to change", again


async def test_the_loaders_own_records_read_done_after_a_restart(tmp_path: Path) -> None:
    """An install that replaces a disabled plugin enables it: the loader records that
    ``PluginEnabled`` itself (done at once, never a request in line). Followed by its
    position it reads succeeded — after a restart too, where it read ``abandoned``."""
    plugins = tmp_path / "plugins"
    plugin(plugins, "quick")
    newer = plugin(tmp_path / "elsewhere", "quick")
    with serve(tmp_path, plugins_dir=plugins, env=ENV, args=("--no-reload",)) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            with anyio.fail_after(60):
                r = await client.post("/admin/plugins/quick/disable", headers=AUTH)
                assert r.status_code == 200, r.text
                code, out, err = await Cli(server, "install", str(newer), "--replace").finish()
                assert code == 0, (out, err)
                r = await client.get(
                    "/admin/events", params={"type": "PluginEnabled"}, headers=AUTH
                )
                (enabled,) = r.json()["events"]
                assert enabled["meta"]["actor"] == "loader", enabled
                url = f"/admin/loader/requests/{enabled['position']}"
                assert (await client.get(url, headers=AUTH)).json()["status"] == "succeeded"
    with serve(tmp_path, plugins_dir=plugins, env=ENV, args=("--no-reload",)) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            with anyio.fail_after(60):
                body = (await client.get(url, headers=AUTH)).json()
                assert body["status"] == "succeeded", body


async def test_the_line_is_bounded_and_paged_over_http_and_by_the_cli(tmp_path: Path) -> None:
    """``services.loader.max_queued``: past it a request is refused at once (429 with
    Retry-After, naming the plugin and the bound, nothing recorded, logged and counted in
    /health); a reload that joins one queued is not refused; ``xcore plugin request``
    lists the whole line by following its pages."""
    plugins = tmp_path / "plugins"
    hold = tmp_path / "hold"
    plugin(plugins, "slow", run=held(hold))
    names = ["a", "b", "c", "d"]
    for name in names:
        plugin(plugins, name)
    env = {**ENV, "XCORE_SERVICES__LOADER__MAX_QUEUED": "3"}
    with serve(tmp_path, plugins_dir=plugins, env=env, args=("--no-reload",)) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            with anyio.fail_after(180):
                hold.touch()
                r = await client.post("/admin/plugins/slow/reload?wait=0", headers=AUTH)
                await until(client, r.json()["url"], "running")
                queued = []
                for name in names[:3]:
                    r = await client.post(f"/admin/plugins/{name}/reload?wait=0", headers=AUTH)
                    assert r.status_code == 202, r.text
                    queued.append(r.json())
                r = await client.post("/admin/plugins/b/reload?wait=0", headers=AUTH)
                assert r.status_code == 202 and r.json()["merged"] is True, r.text
                events = (await client.get("/admin/events", headers=AUTH)).json()["events"]
                r = await client.post("/admin/plugins/d/reload?wait=0", headers=AUTH)
                assert r.status_code == 429, r.text
                assert int(r.headers["retry-after"]) >= 1
                assert "reload of plugin 'd'" in r.json()["detail"]
                assert "services.loader.max_queued = 3" in r.json()["detail"]
                after = (await client.get("/admin/events", headers=AUTH)).json()["events"]
                assert after == events  # nothing recorded
                # the CLI says the same (exit 1), and reads the line a page at a time
                code, out, err = await Cli(server, "reload", "d").finish()
                assert code == 1 and "error (429)" in err and "plugin 'd'" in err, (out, err)
                code, out, err = await Cli(server, "request", "--page", "1").finish()
                assert code == 0, err
                assert "in hand: request " in out and "slow" in out, out
                for place, q in enumerate(queued, start=1):
                    assert (
                        f"  {place}. request {q['id']} (PluginReloadRequested {q['name']})" in out
                    )
                assert "in line: 3" in out, out
                code, out, err = await Cli(server, "request", "--json", "--page", "2").finish()
                listed = json.loads(out)
                assert [q["id"] for q in listed["queued"]] == [q["id"] for q in queued]
                code, out, err = await Cli(server, "request", "--page", "0").finish()
                assert code == 1 and "--page 0" in err, (out, err)
                health = (await client.get("/health", headers=AUTH)).json()
                seen = health["components"]["loader"]["requests"]
                assert (seen["queued"], seen["max_queued"], seen["refused"]) == (3, 3, 2), seen
                assert "queue is full" in server.output() and "plugin 'd'" in server.output()
                bad = await client.get("/admin/loader/requests?limit=-1", headers=AUTH)
                assert bad.status_code == 422, bad.text
                bad = await client.get("/admin/loader/requests?cursor=x", headers=AUTH)
                assert bad.status_code == 422 and "next_cursor" in bad.text, bad.text
                hold.unlink()
                for q in queued:
                    done = await until(client, str(q["url"]), "succeeded", "failed")
                    assert done["status"] == "succeeded", done
                r = await client.post("/admin/plugins/d/reload", headers=AUTH)
                assert r.status_code == 200, r.text


async def test_an_enable_or_disable_left_in_line_by_a_kill_reads_as_what_the_restart_did(
    tmp_path: Path,
) -> None:
    """A disable and an enable wait in line when the server is killed. The plugins'
    enabled state is read from the log, so the next start acts on them (``off`` is not
    loaded, ``on`` is): their requests read so, not ``abandoned ... ask again`` (which
    would answer 409 "already disabled"). A reload left so, never run, is abandoned."""
    plugins = tmp_path / "plugins"
    hold = tmp_path / "hold"
    plugin(plugins, "slow", run=held(hold))
    plugin(plugins, "off")
    plugin(plugins, "on")
    plugin(plugins, "quick")
    with serve(tmp_path, plugins_dir=plugins, env=ENV, args=("--no-reload",)) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            with anyio.fail_after(120):
                r = await client.post("/admin/plugins/on/disable", headers=AUTH)
                assert r.status_code == 200, r.text
                hold.touch()
                r = await client.post("/admin/plugins/slow/reload?wait=0", headers=AUTH)
                await until(client, r.json()["url"], "running")
                asked = {}
                for name, verb in (("off", "disable"), ("on", "enable"), ("quick", "reload")):
                    r = await client.post(f"/admin/plugins/{name}/{verb}?wait=0", headers=AUTH)
                    assert r.status_code == 202, r.text
                    asked[verb] = r.json()["url"]
                server.process.kill()
                server.process.wait()
                hold.unlink()
    with serve(tmp_path, plugins_dir=plugins, env=ENV, args=("--no-reload",)) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            with anyio.fail_after(60):
                states = {
                    p["name"]: p["status"]
                    for p in (await client.get("/admin/plugins", headers=AUTH)).json()
                }
                assert (states["off"], states["on"]) == ("disabled", "loaded"), states
                for verb in ("disable", "enable"):
                    body = (await client.get(asked[verb], headers=AUTH)).json()
                    assert body["status"] == "succeeded", body
                body = (await client.get(asked["reload"], headers=AUTH)).json()
                assert (body["status"], body["stage"]) == ("failed", "abandoned"), body
