"""The loader service in a real kernel: boot, failures by stage, reload semantics, state."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import anyio

from services.loader.events import PluginLoaded

from .conftest import AUTH, status_router, write_plugin


async def test_boot_loads_in_dependency_order_and_serves(harness_factory, plugins: Path) -> None:
    write_plugin(
        plugins,
        "zeta",
        info={"version": "1.0.0", "api_prefix": "/app/zeta", "requires": {"alpha": ">=1,<2"}},
        router=status_router('{"who": "zeta"}'),
    )
    write_plugin(
        plugins,
        "alpha",
        info={"version": "1.4.0", "Api_prefix": "/app/alpha"},
        router=status_router('{"who": "alpha"}'),
    )
    h = await harness_factory()
    loaded = await h.events("PluginLoaded")
    assert [r.data["name"] for r in loaded] == ["alpha", "zeta"]
    first = loaded[0].data
    assert first["version"] == "1.4.0" and first["generation"] == 1 and first["mode"] == "trusted"
    assert first["routes"] == ["GET /app/alpha/status"] and first["prefix"] == "/app/alpha"
    assert (await h.client.get("/app/zeta/status")).json() == {"who": "zeta"}
    assert (await h.client.get("/app/alpha/status")).json() == {"who": "alpha"}
    assert len(await h.events("RoutesMounted")) == 2
    rt = h.kernel.plugins.get("alpha", 1)
    assert rt.prefix == "/app/alpha" and rt.router is not None and rt.context is not None


async def test_one_broken_plugin_never_stops_the_others(harness_factory, plugins: Path) -> None:
    write_plugin(plugins, "good", router=status_router())
    write_plugin(plugins, "boom", run="raise RuntimeError('kaboom at import')\n")
    write_plugin(plugins, "syntax", router="def broken(:\n")
    write_plugin(plugins, "needy", info={"version": "1.0.0", "requires": ["boom"]})
    write_plugin(
        plugins,
        "sandy",
        info={"version": "1.0.0", "mode": "sandboxed"},
        run="raise SystemExit('a sandboxed plugin must never run here')\n",
    )
    write_plugin(plugins, "greedy", info={"version": "1.0.0", "api_prefix": "/admin/x"})
    write_plugin(plugins, "twin", info={"version": "1.0.0", "api_prefix": "/app/good/sub"})
    write_plugin(plugins, "badinfo", info={"version": "1.0.0", "colour": "red"})
    h = await harness_factory()
    failed = {r.data["name"]: r.data for r in await h.events("PluginLoadFailed")}
    assert failed["boom"]["stage"] == "import"
    assert "run.py line 2: RuntimeError: kaboom at import" in failed["boom"]["error"]
    assert "Traceback" in failed["boom"]["traceback"]
    assert failed["syntax"]["stage"] == "import" and "router.py line 1" in failed["syntax"]["error"]
    assert failed["needy"]["stage"] == "dependency" and "boom" in failed["needy"]["error"]
    assert failed["sandy"]["stage"] == "mode" and "sandboxed" in failed["sandy"]["error"]
    assert failed["greedy"]["stage"] == "manifest" and "/admin" in failed["greedy"]["error"]
    assert failed["twin"]["stage"] == "manifest" and "plugin 'good'" in failed["twin"]["error"]
    assert failed["badinfo"]["stage"] == "manifest"
    assert "plugin 'badinfo': run.py: key 'colour': unknown key" in failed["badinfo"]["error"]
    assert (await h.client.get("/app/good/status")).status_code == 200
    assert h.table.rows["good"]["status"] == "loaded"
    assert h.table.rows["boom"]["status"] == "failed"
    assert h.table.rows["boom"]["last_error"]["stage"] == "import"
    assert "xcore_plugins.boom" not in sys.modules
    assert h.kernel.started


async def test_config_yaml_and_model(harness_factory, plugins: Path) -> None:
    run = """
        from pydantic import BaseModel, ConfigDict
        class Config(BaseModel):
            model_config = ConfigDict(extra="forbid")
            greeting: str
            times: int = 1
        seen = []
        def on_load(ctx):
            seen.append(ctx.config)
        """
    write_plugin(plugins, "cfg", run=run, config="greeting: hi\ntimes: 3\n")
    write_plugin(plugins, "cfgbad", run=run, config="greeting: hi\ntimes: many\nextra: 1\n")
    write_plugin(plugins, "yamlbad", config="greeting: [unclosed\n")
    write_plugin(
        plugins,
        "plain",
        config="anything: [1, 2]\n",
        run="seen = []\ndef on_load(ctx):\n    seen.append(ctx.config)\n",
    )
    h = await harness_factory()
    failed = {r.data["name"]: r.data for r in await h.events("PluginLoadFailed")}
    assert failed["cfgbad"]["stage"] == "config"
    assert "plugin 'cfgbad': config.yaml: key 'times'" in failed["cfgbad"]["error"]
    assert "key 'extra': unknown key" in failed["cfgbad"]["error"]
    assert failed["yamlbad"]["stage"] == "config"
    assert "config.yaml: line 2: not valid YAML" in failed["yamlbad"]["error"]
    assert "cfg" not in failed and "plain" not in failed, failed  # with the tracebacks
    cfg = h.kernel.plugins.get("cfg", 1).module
    assert cfg is not None
    assert (cfg.seen[0].greeting, cfg.seen[0].times) == ("hi", 3)
    plain = h.kernel.plugins.get("plain", 1).module
    assert plain is not None and plain.seen == [{"anything": [1, 2]}]


async def test_hooks_context_and_threads(harness_factory, plugins: Path) -> None:
    run = """
        import threading
        from kernel.sdk import current_plugin
        from kernel.events import Event
        class Pinged(Event):
            n: int
        record = {}
        def on_load(ctx):
            record["thread"] = threading.current_thread().name
            record["current"] = current_plugin().name
            record["logger"] = ctx.logger.name
            record["data_dir"] = ctx.data_dir
        async def on_unload(ctx):
            record["unloaded"] = True
        """
    write_plugin(plugins, "hooky", run=run)
    h = await harness_factory()
    mod = h.kernel.plugins.get("hooky", 1).module
    assert mod is not None
    rec = mod.record
    assert rec["thread"] != threading.main_thread().name  # the sync hook ran off the loop
    assert rec["current"] == "hooky"
    assert rec["logger"] == "xcore.plugin.hooky"
    assert rec["data_dir"].is_dir()
    ctx = h.kernel.plugins.get("hooky", 1).context
    assert ctx is not None
    await ctx.append(mod.Pinged(n=1))
    pings = await h.events("Pinged")
    assert pings[0].stream == "plugin-hooky" and pings[0].meta.actor == "plugin:hooky"
    await h.stop()
    assert rec["unloaded"] is True
    await h.start()
    unloaded = [r for r in await h.events("PluginUnloaded") if r.data["name"] == "hooky"]
    assert unloaded[-1].data["reason"] == "kernel stopping"


async def test_hook_failure_is_recorded(harness_factory, plugins: Path) -> None:
    write_plugin(
        plugins,
        "sour",
        run="async def on_load(ctx):\n    raise ValueError('no config')\n",
        router=status_router(),
    )
    h = await harness_factory()
    [failed] = await h.events("PluginLoadFailed", name="sour")
    assert failed.data["stage"] == "hook"
    assert "on_load raised ValueError: no config" in failed.data["error"]
    assert h.kernel.plugins.generations("sour") == []
    assert (await h.client.get("/app/sour/status")).status_code == 404


async def test_tasks_only_plugin_and_router_without_manifest_prefix(
    harness_factory, plugins: Path
) -> None:
    write_plugin(
        plugins,
        "tasky",
        info={"version": "1.0.0"},
        run="from kernel.sdk import task\n@task(every='1h')\ndef tick():\n    pass\n",
    )
    write_plugin(
        plugins,
        "ownprefix",
        info={"version": "1.0.0"},
        router="from fastapi import APIRouter\nrouter = APIRouter(prefix='/own')\n"
        "@router.get('/ping')\nasync def ping():\n    return 'pong'\n",
    )
    h = await harness_factory()
    loaded = {r.data["name"]: r.data for r in await h.events("PluginLoaded")}
    assert loaded["tasky"]["tasks"] == ["tick"] and loaded["tasky"]["prefix"] is None
    assert h.kernel.plugins.get("tasky", 1).tasks["tick"].every == "1h"
    assert loaded["ownprefix"]["prefix"] == "/own"
    assert (await h.client.get("/own/ping")).json() == "pong"


async def test_reload_runs_new_code_of_every_module(harness_factory, plugins: Path) -> None:
    write_plugin(
        plugins,
        "multi",
        files={"helper.py": "VALUE = 'one'\n"},
        router="from fastapi import APIRouter\nfrom .helper import VALUE\nrouter = APIRouter()\n"
        "@router.get('/v')\nasync def v():\n    return VALUE\n",
    )
    h = await harness_factory()
    assert (await h.client.get("/app/multi/v")).json() == "one"
    (plugins / "multi" / "helper.py").write_text("VALUE = 'two'\n")  # same size, same second
    r = await h.client.post("/admin/plugins/multi/reload", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["outcome"] == "PluginReloaded"
    assert (r.json()["old_generation"], r.json()["generation"]) == (1, 2)
    assert (await h.client.get("/app/multi/v")).json() == "two"
    assert h.kernel.plugins.generations("multi")[0].generation == 2
    assert len(h.kernel.plugins.generations("multi")) == 1
    # the old generation was unloaded only after the new one was mounted
    kinds = [
        (r.type, r.data.get("generation"))
        for r in await h.kernel.read()
        if r.type in ("PluginLoaded", "PluginUnloaded", "RoutesMounted", "PluginReloaded")
        and (r.data.get("name") or r.data.get("plugin")) == "multi"
    ]
    assert kinds == [
        ("PluginLoaded", 1),
        ("RoutesMounted", 1),
        ("PluginLoaded", 2),
        ("RoutesMounted", 2),
        ("PluginUnloaded", 1),
        ("PluginReloaded", 2),
    ]


async def test_failed_reload_keeps_the_old_generation(harness_factory, plugins: Path) -> None:
    folder = write_plugin(
        plugins, "steady", router=status_router('"v1"'), files={"helper.py": "X = 1\n"}
    )
    h = await harness_factory()
    bad_versions = {
        "router.py": "def broken(:\n",  # syntax error
        "helper.py": "import does_not_exist\n",  # import error
        "run.py": "PLUGIN_INFO = {'version': 'nope'}\n",  # invalid manifest
    }
    expected_stage = {"router.py": "import", "helper.py": "import", "run.py": "manifest"}
    (folder / "router.py").write_text(
        "from fastapi import APIRouter\nfrom . import helper\nrouter = APIRouter()\n"
        "@router.get('/status')\nasync def s():\n    return 'v2'\n"
    )
    r = await h.client.post("/admin/plugins/steady/reload", headers=AUTH)
    assert r.json()["generation"] == 2
    for file, text in bad_versions.items():
        good = (folder / file).read_text()
        (folder / file).write_text(text)
        r = await h.client.post("/admin/plugins/steady/reload", headers=AUTH)
        assert r.status_code == 422
        body = r.json()
        assert body["outcome"] == "PluginReloadFailed"
        assert body["stage"] == expected_stage[file], body
        assert body["serving_generation"] == 2
        assert (await h.client.get("/app/steady/status")).json() == "v2"
        assert h.table.rows["steady"]["generation"] == 2
        assert h.table.rows["steady"]["last_error"]["stage"] == expected_stage[file]
        (folder / file).write_text(good)
    (folder / "run.py").write_text(
        "PLUGIN_INFO = {'version': '1.0.0', 'api_prefix': '/app/steady'}\n"
        "def on_load(ctx):\n    raise RuntimeError('refuse')\n"
    )
    r = await h.client.post("/admin/plugins/steady/reload", headers=AUTH)
    assert r.json()["stage"] == "hook"
    assert (await h.client.get("/app/steady/status")).json() == "v2"
    # the module of the serving generation is still the one in sys.modules
    serving = h.loader.loaded["steady"]
    assert (
        sys.modules["xcore_plugins.steady.router"] is serving.modules["xcore_plugins.steady.router"]
    )
    assert h.loader.loaded["steady"].generation == 2


async def test_reload_refused_when_prefix_collides(harness_factory, plugins: Path) -> None:
    write_plugin(plugins, "one", router=status_router())
    folder = write_plugin(plugins, "two", router=status_router())
    h = await harness_factory()
    (folder / "run.py").write_text(
        "PLUGIN_INFO = {'version': '1.0.0', 'api_prefix': '/app/one/x'}\n"
    )
    r = await h.client.post("/admin/plugins/two/reload", headers=AUTH)
    assert r.status_code == 422 and r.json()["stage"] == "manifest"
    assert "collides with plugin 'one'" in r.json()["error"]
    assert (await h.client.get("/app/two/status")).status_code == 200


async def test_subscriptions_end_at_unload(harness_factory, plugins: Path) -> None:
    run = """
        seen = []
        async def on_load(ctx):
            await ctx.subscribe(lambda r: seen.append(r.type), types=["KernelStopped", "Poke"])
        """
    write_plugin(plugins, "listener", run=run)
    write_plugin(
        plugins, "poker", run="from kernel.events import Event\nclass Poke(Event):\n    n: int\n"
    )
    h = await harness_factory()
    mod = h.kernel.plugins.get("listener", 1).module
    poke = h.kernel.plugins.get("poker", 1).module
    assert mod is not None and poke is not None
    before = len(h.kernel._subscriptions)
    await h.kernel.append(poke.Poke(n=1), stream="x")
    with anyio.fail_after(5):
        while mod.seen != ["Poke"]:
            await anyio.sleep(0.01)
    r = await h.client.post("/admin/plugins/listener/disable", headers=AUTH)
    assert r.json()["outcome"] == "PluginUnloaded"
    assert len(h.kernel._subscriptions) == before - 1
    await h.kernel.append(poke.Poke(n=2), stream="x")
    await h.kernel.settle()
    assert mod.seen == ["Poke"]


async def test_disabled_survives_restart(harness_factory, plugins: Path) -> None:
    write_plugin(plugins, "sleepy", router=status_router())
    h = await harness_factory()
    r = await h.client.post("/admin/plugins/sleepy/disable", headers=AUTH)
    assert r.status_code == 200 and r.json()["outcome"] == "PluginUnloaded"
    assert (await h.client.get("/app/sleepy/status")).status_code == 404
    await h.restart()
    assert h.table.rows["sleepy"]["status"] == "disabled"
    assert (await h.client.get("/app/sleepy/status")).status_code == 404
    assert h.loader.loaded == {}
    r = await h.client.post("/admin/plugins/sleepy/enable", headers=AUTH)
    assert r.json()["outcome"] == "PluginReloaded" and r.json()["generation"] == 2
    assert (await h.client.get("/app/sleepy/status")).status_code == 200
    await h.restart()
    assert h.table.rows["sleepy"]["status"] == "loaded"
    assert h.table.rows["sleepy"]["generation"] == 3  # generations never repeat across boots


async def test_watcher_reloads_changed_new_and_removed_folders(
    harness_factory, plugins: Path
) -> None:
    folder = write_plugin(plugins, "watched", router=status_router('"a"'))
    h = await harness_factory(reload=True)
    with anyio.fail_after(10):
        await h.loader_service.watching.wait()
    (folder / "router.py").write_text(status_router('"b"').replace("        ", ""))
    reloaded = await h.wait_for("PluginReloaded", "watched")
    assert (await h.client.get("/app/watched/status")).json() == "b"
    [request] = await h.events("PluginReloadRequested", name="watched")
    assert request.meta.actor == "watcher" and "router.py" in request.data["reason"]
    assert reloaded[0].meta.correlation_id == request.meta.id
    write_plugin(plugins, "newcomer", router=status_router('"new"'))
    await h.wait_for("PluginReloaded", "newcomer")
    with anyio.fail_after(10):
        while (await h.client.get("/app/newcomer/status")).status_code != 200:
            await anyio.sleep(0.02)
    import shutil

    shutil.rmtree(folder)
    await h.wait_for("PluginUninstalled", "watched")
    await h.kernel.settle()
    assert (await h.client.get("/app/watched/status")).status_code == 404
    assert "watched" not in h.table.rows


async def test_plugin_loaded_follows_runtime_publication(harness_factory, plugins: Path) -> None:
    write_plugin(plugins, "pub", router=status_router())
    h = await harness_factory()
    [loaded] = await h.events(PluginLoaded.type_name, name="pub")
    assert loaded.data["digest"] and loaded.data["duration_ms"] > 0
    assert h.kernel.plugins.get("pub", 1).version == "1.0.0"


async def test_a_removed_folder_unloads_its_dependents_transitively(
    harness_factory, plugins: Path
) -> None:
    import shutil

    write_plugin(plugins, "base", router=status_router())
    write_plugin(plugins, "mid", info={"version": "1.0.0", "requires": ["base"]})
    write_plugin(plugins, "top", info={"version": "1.0.0", "requires": ["mid"]})
    h = await harness_factory()
    assert set(h.loader.loaded) == {"base", "mid", "top"}
    assert h.loader.dependents("base") == ["top", "mid"]  # unload order: leaves first
    shutil.rmtree(plugins / "base")
    await h.loader.reload("base", None)
    assert h.loader.loaded == {}
    unloaded = [r.data["name"] for r in await h.events("PluginUnloaded")]
    assert unloaded == ["top", "mid", "base"]


async def test_a_removed_folder_put_back_unchanged_loads_again(
    harness_factory, plugins: Path
) -> None:
    import shutil

    folder = write_plugin(plugins, "phoenix", router=status_router('"up"'))
    h = await harness_factory(reload=True)
    with anyio.fail_after(10):
        await h.loader_service.watching.wait()
    shutil.rmtree(folder)
    await h.wait_for("PluginUninstalled", "phoenix")
    write_plugin(plugins, "phoenix", router=status_router('"up"'))  # the same content
    with anyio.fail_after(10):
        while (await h.client.get("/app/phoenix/status")).status_code != 200:
            await anyio.sleep(0.02)
    assert (await h.client.get("/app/phoenix/status")).json() == "up"
