"""The loader's admin API: guarded, answers with outcome events, refuses nonsense first."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from .conftest import AUTH, status_router, write_plugin

RUN = "PLUGIN_INFO = {'version': '1.0.0', 'api_prefix': '/app/%s'}\n"


def tree(folder: Path) -> list[str]:
    return sorted(p.as_posix() for p in folder.rglob("*"))


def zipped(name: str, extra: dict[str, str] | None = None, run: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(f"{name}/__init__.py", "")
        zf.writestr(f"{name}/run.py", run if run is not None else RUN % name)
        files = {"router.py": status_router(f'"{name}"').replace("        ", ""), **(extra or {})}
        for rel, text in files.items():
            zf.writestr(f"{name}/{rel}", text)
    return buf.getvalue()


async def test_every_route_needs_the_token(harness_factory, plugins: Path) -> None:
    write_plugin(plugins, "hello", router=status_router())
    h = await harness_factory()
    calls = [
        ("GET", "/admin/plugins"),
        ("GET", "/admin/plugins/hello"),
        ("POST", "/admin/plugins/reload"),
        ("POST", "/admin/plugins/hello/reload"),
        ("POST", "/admin/plugins/hello/enable"),
        ("POST", "/admin/plugins/hello/disable"),
        ("POST", "/admin/plugins"),
        ("DELETE", "/admin/plugins/hello"),
    ]
    for method, path in calls:
        for headers in ({}, {"Authorization": "Bearer wrong-token-0000000000"}):
            r = await h.client.request(method, path, headers=headers)
            assert r.status_code == 401, (method, path, r.status_code)
    assert h.loader.loaded["hello"].generation == 1
    assert await h.events("PluginReloadRequested", "PluginDisabled") == []


async def test_list_and_get(harness_factory, plugins: Path) -> None:
    write_plugin(plugins, "hello", router=status_router())
    write_plugin(plugins, "broken", run="raise ImportError('nope')\n")
    h = await harness_factory()
    rows = (await h.client.get("/admin/plugins", headers=AUTH)).json()
    by_name = {r["name"]: r for r in rows}
    hello = by_name["hello"]
    assert (hello["status"], hello["version"], hello["mode"], hello["generation"]) == (
        "loaded",
        "1.0.0",
        "trusted",
        1,
    )
    assert hello["prefix"] == "/app/hello" and hello["routes"] == ["GET /app/hello/status"]
    assert hello["last_error"] is None and hello["installed"] is True
    assert by_name["broken"]["status"] == "failed"
    assert by_name["broken"]["last_error"]["stage"] == "import"
    one = await h.client.get("/admin/plugins/hello", headers=AUTH)
    assert one.json()["name"] == "hello"
    missing = await h.client.get("/admin/plugins/ghost", headers=AUTH)
    assert missing.status_code == 404 and "ghost" in missing.json()["detail"]


async def test_reload_all_and_unknown(harness_factory, plugins: Path) -> None:
    write_plugin(plugins, "a", router=status_router())
    write_plugin(plugins, "b", info={"version": "1.0.0", "requires": ["a"]})
    h = await harness_factory()
    r = await h.client.post("/admin/plugins/reload", headers=AUTH)
    assert r.status_code == 200
    body = r.json()
    assert body["reloaded"] == 2 and body["failed"] == 0
    assert [x["name"] for x in body["results"]] == ["a", "b"]
    # reloading a reloads b with it (b requires a); b's own request reloads it once more
    assert [x["generation"] for x in body["results"]] == [2, 3]
    assert (await h.client.post("/admin/plugins/ghost/reload", headers=AUTH)).status_code == 404
    requests = await h.events("PluginReloadRequested")
    assert all(rq.meta.actor == "admin" for rq in requests)


async def test_enable_disable_conflicts(harness_factory, plugins: Path) -> None:
    write_plugin(plugins, "base", router=status_router())
    write_plugin(plugins, "top", info={"version": "1.0.0", "requires": {"base": ">=1"}})
    h = await harness_factory()
    r = await h.client.post("/admin/plugins/base/enable", headers=AUTH)
    assert r.status_code == 409 and "already enabled" in r.json()["detail"]
    r = await h.client.post("/admin/plugins/base/disable", headers=AUTH)
    assert r.status_code == 409 and "required by loaded plugin(s) top" in r.json()["detail"]
    r = await h.client.delete("/admin/plugins/base", headers=AUTH)
    assert r.status_code == 409
    assert (plugins / "base").is_dir() and "base" in h.loader.loaded
    assert (await h.client.post("/admin/plugins/top/disable", headers=AUTH)).status_code == 200
    r = await h.client.post("/admin/plugins/top/disable", headers=AUTH)
    assert r.status_code == 409 and "already disabled" in r.json()["detail"]
    r = await h.client.post("/admin/plugins/top/reload", headers=AUTH)
    assert r.status_code == 409


async def test_install_upload_then_uninstall(harness_factory, plugins: Path) -> None:
    h = await harness_factory()
    r = await h.client.post(
        "/admin/plugins",
        headers=AUTH,
        files={"file": ("fresh.zip", zipped("fresh"), "application/zip")},
    )
    assert r.status_code == 200, r.text
    assert r.json()["outcome"] == "PluginReloaded" and r.json()["old_generation"] is None
    assert (await h.client.get("/app/fresh/status")).json() == "fresh"
    [installed] = await h.events("PluginInstalled", name="fresh")
    assert installed.data["version"] == "1.0.0" and installed.data["digest"]
    assert not list((h.tmp / "var" / "uploads").iterdir())
    again = await h.client.post(
        "/admin/plugins", headers=AUTH, files={"file": ("fresh.zip", zipped("fresh"), "x")}
    )
    assert again.status_code == 422 and "already installed" in again.json()["detail"]
    replaced = await h.client.post(
        "/admin/plugins",
        headers=AUTH,
        files={
            "file": (
                "fresh.zip",
                zipped("fresh", {"router.py": status_router('"v2"').replace("        ", "")}),
                "x",
            )
        },
        data={"replace": "true"},
    )
    assert replaced.json()["generation"] == 2
    assert (await h.client.get("/app/fresh/status")).json() == "v2"
    r = await h.client.delete("/admin/plugins/fresh", headers=AUTH)
    assert r.status_code == 200 and r.json()["outcome"] == "PluginUninstalled"
    assert not (plugins / "fresh").exists()
    assert (await h.client.get("/app/fresh/status")).status_code == 404
    assert (await h.client.get("/admin/plugins/fresh", headers=AUTH)).status_code == 404


async def test_bad_uploads_change_nothing(harness_factory, plugins: Path) -> None:
    write_plugin(plugins, "keep", router=status_router())
    h = await harness_factory()
    before = tree(plugins)
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../escape/run.py", RUN % "escape")
    cases = [
        (("evil.zip", evil.getvalue()), 422, "contains '..'"),
        (("bad.zip", zipped("bad", {"x.py": "def (:\n"})), 422, "x.py: line 1"),
        (("clash.zip", zipped("clash", run=RUN % "keep")), 422, "collides with plugin 'keep'"),
        (
            (
                "admin.zip",
                zipped("adm", run="PLUGIN_INFO = {'version': '1.0.0', 'api_prefix': '/admin'}\n"),
            ),
            422,
            "kernel's own routes",
        ),
        (("notes.txt", b"hello"), 422, "not an archive"),
        (("huge.zip", b"x" * (21 * 1024 * 1024)), 413, "exceeds the limit"),
    ]
    for (filename, data), status, fragment in cases:
        r = await h.client.post("/admin/plugins", headers=AUTH, files={"file": (filename, data)})
        assert r.status_code == status, (filename, r.text)
        assert fragment in r.json()["detail"], (filename, r.json())
    assert tree(plugins) == before
    failures = await h.events("PluginInstallFailed")
    assert len(failures) == 4  # the last two were refused before any request was recorded
    assert (await h.client.get("/app/keep/status")).status_code == 200
