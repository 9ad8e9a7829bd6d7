"""Supervision: breaches and crashes are recorded, workers restart, the circuit opens,
calls fail fast with 503, reloads swap workers and keep the old one on failure."""

from __future__ import annotations

from typing import Any

import anyio

from tests.services.sandbox.conftest import AUTH, sandboxed, write_plugin

CRASHY = """
    import os
    from fastapi import APIRouter
    router = APIRouter()

    @router.get("/ok")
    async def ok():
        return {"pid": os.getpid()}

    @router.get("/die")
    async def die():
        os._exit(3)

    @router.get("/spin")
    def spin():  # sync: in a thread, the worker's loop (and its heartbeat) stays alive
        while True:
            pass
"""


async def test_a_crash_is_recorded_and_the_worker_restarts(harness: Any, level: str) -> None:
    h = await harness(level)
    write_plugin(h.plugins, "crashy", info=sandboxed("crashy"), router=CRASHY)
    assert (await h.reload("crashy")).status_code == 200
    first = (await h.client.get("/app/crashy/ok")).json()["pid"]
    died = await h.client.get("/app/crashy/die")
    assert died.status_code == 502
    assert "crashy" in died.json()["detail"]
    crashed = await h.wait_for("SandboxCrashed", "crashy")
    assert crashed[0].data["exit"] == 3
    await h.wait_for("SandboxRestarted", "crashy")
    with anyio.fail_after(30):
        while True:
            again = await h.client.get("/app/crashy/ok")
            if again.status_code == 200:
                break
            assert again.status_code == 503, again.text  # restarting: fail fast, never hang
            await anyio.sleep(0.05)
    if level == "rlimits":
        assert again.json()["pid"] != first


async def test_a_wall_time_breach_kills_the_worker_and_others_keep_serving(harness: Any) -> None:
    h = await harness("rlimits")
    write_plugin(
        h.plugins, "slow", info=sandboxed("slow", limits={"wall_time": "1s"}), router=CRASHY
    )
    write_plugin(h.plugins, "calm", info=sandboxed("calm"), router=CRASHY)
    assert (await h.reload("slow")).status_code == 200
    assert (await h.reload("calm")).status_code == 200
    async with anyio.create_task_group() as tg:
        results: dict[str, int] = {}

        async def attack() -> None:
            results["spin"] = (await h.client.get("/app/slow/spin")).status_code

        tg.start_soon(attack)
        for _ in range(5):
            assert (await h.client.get("/app/calm/ok")).status_code == 200
            await anyio.sleep(0.05)
    assert results["spin"] == 504
    breach = await h.wait_for("SandboxLimitExceeded", "slow")
    assert breach[0].data["limit"] == "wall"
    assert breach[0].data["value"] == 1.0


async def test_the_circuit_opens_after_repeated_crashes_until_a_reload(harness: Any) -> None:
    h = await harness("rlimits", sandbox={"circuit_crashes": 2, "restart_backoff_s": 0.05})
    write_plugin(h.plugins, "flaky", info=sandboxed("flaky"), router=CRASHY)
    assert (await h.reload("flaky")).status_code == 200
    with anyio.fail_after(60):
        while not await h.events("SandboxCircuitOpened", plugin="flaky"):
            r = await h.client.get("/app/flaky/die")
            assert r.status_code in (502, 503)
            await anyio.sleep(0.05)
    r = await h.client.get("/app/flaky/ok")
    assert r.status_code == 503
    assert "flaky" in r.json()["detail"] and "circuit" in r.json()["detail"]
    row = (await h.client.get("/admin/plugins/flaky", headers=AUTH)).json()
    assert row["host"]["state"] == "open"
    assert (await h.reload("flaky")).status_code == 200
    assert (await h.client.get("/app/flaky/ok")).status_code == 200


async def test_a_broken_new_version_keeps_the_old_worker_serving(harness: Any) -> None:
    h = await harness("rlimits")
    folder = write_plugin(h.plugins, "swap", info=sandboxed("swap"), router=CRASHY)
    assert (await h.reload("swap")).status_code == 200
    old_pid = (await h.client.get("/app/swap/ok")).json()["pid"]
    (folder / "router.py").write_text("raise RuntimeError('broken on purpose')\n")
    r = await h.reload("swap")
    assert r.status_code == 422
    assert "broken on purpose" in r.json()["detail"]
    assert (await h.client.get("/app/swap/ok")).json()["pid"] == old_pid
    write_plugin(h.plugins, "swap", info=sandboxed("swap"), router=CRASHY)
    assert (await h.reload("swap")).status_code == 200
    new_pid = (await h.client.get("/app/swap/ok")).json()["pid"]
    assert new_pid != old_pid
    stopped = await h.wait_for("SandboxStopped", "swap")
    assert stopped[0].data["pid"] == old_pid


async def test_exit_at_import_fails_the_load_with_the_exit_named(harness: Any, level: str) -> None:
    h = await harness(level)
    write_plugin(h.plugins, "quitter", info=sandboxed("quitter"), run="import os\nos._exit(1)\n")
    r = await h.reload("quitter")
    assert r.status_code == 422
    assert "exit code 1" in r.json()["detail"]
    assert not await h.events("SandboxStarted", plugin="quitter")
