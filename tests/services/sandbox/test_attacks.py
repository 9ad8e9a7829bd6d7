"""Attacks by a hostile or careless sandboxed plugin that once got through, each kept as
a test: reloads racing requests in flight, the wire used to spoof or flood the kernel's
log, a worker that keeps root trying to lift its process limit or signal the kernel."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.services.sandbox.conftest import Harness, sandboxed, write_plugin

SLOW = """
    import asyncio
    import os
    from fastapi import APIRouter
    router = APIRouter()

    @router.get("/slow")
    async def slow():
        # answers once the test says so (after the reload has swapped the workers)
        while not os.path.exists(os.path.join(os.environ["HOME"], "release")):
            await asyncio.sleep(0.02)
        return {"pid": os.getpid(), "done": True}

    @router.get("/ok")
    async def ok():
        return {"pid": os.getpid()}
"""


async def test_a_reload_lets_the_old_workers_requests_in_flight_finish(
    harness: Any, level: str
) -> None:
    h = await harness(level)
    write_plugin(h.plugins, "slowpoke", info=sandboxed("slowpoke"), router=SLOW)
    assert (await h.reload("slowpoke")).status_code == 200
    answers: list[Any] = []
    async with anyio.create_task_group() as tg:

        async def slow() -> None:
            answers.append(await h.client.get("/app/slowpoke/slow"))

        tg.start_soon(slow)
        with anyio.fail_after(30):
            # the request has reached the worker
            while not any(p.worker and p.worker.in_flight for p in h.service.plugins.values()):
                await anyio.sleep(0.01)
        assert (await h.reload("slowpoke")).status_code == 200
        await anyio.Path(h.base / "var" / "plugins" / "slowpoke" / "release").write_text("")
    [answer] = answers
    # the old generation answered its request, as a trusted plugin's would
    assert answer.status_code == 200, answer.text
    assert answer.json()["done"] is True
    assert (await h.client.get("/app/slowpoke/ok")).status_code == 200


WIRE = """
    import gc
    from fastapi import APIRouter
    router = APIRouter()

    def wire():
        return next(o for o in gc.get_objects() if type(o).__name__ == "Wire")

    @router.get("/log")
    async def log():
        # raw frames, past the worker's own logging handler (which a plugin can bypass)
        wire().send({"op": "log", "level": 40, "logger": "xcore.plugin.wiretapx.evil",
                     "message": "spoofed"})
        wire().send({"op": "log", "level": 40, "message": "big" + "x" * (1024 * 1024)})
        return {"sent": True}
"""


async def test_log_frames_cannot_spoof_another_plugins_logger_nor_flood_the_log(
    harness: Any, caplog: pytest.LogCaptureFixture
) -> None:
    h = await harness("rlimits")
    write_plugin(h.plugins, "wiretap", info=sandboxed("wiretap"), router=WIRE)
    assert (await h.reload("wiretap")).status_code == 200
    with caplog.at_level(logging.INFO):
        assert (await h.client.get("/app/wiretap/log")).status_code == 200
        with anyio.fail_after(30):
            while not any(r.getMessage().startswith("big") for r in caplog.records):
                await anyio.sleep(0.01)
    spoofed = [r for r in caplog.records if r.getMessage() == "spoofed"]
    [big] = [r for r in caplog.records if r.getMessage().startswith("big")]
    assert [r.name for r in spoofed] == ["xcore.plugin.wiretap.xcore.plugin.wiretapx.evil"]
    assert len(big.getMessage()) <= 70_000
    assert getattr(big, "plugin", None) == "wiretap"


ESCAPE = """
    import os
    from fastapi import APIRouter
    router = APIRouter()

    def attempt(fn):
        try:
            fn()
            return "done"
        except OSError as exc:
            return f"refused: {exc.strerror}"

    def write(path, text):
        with open(path, "w") as f:
            f.write(text)

    @router.get("/escape")
    def escape(kernel: int):
        out = {"signal": attempt(lambda: os.kill(kernel, 0))}
        mine = [l.split(":", 2)[2] for l in open("/proc/self/cgroup").read().splitlines()
                if l.split(":")[1] == "pids"]
        points = [l.split(" - ")[0].split()[4] for l in open("/proc/self/mountinfo")
                  if l.split(" - ")[1].split()[0] == "cgroup" and "pids" in l.split()[-1]]
        for point in points:
            for rel in mine:
                out["raise " + point] = attempt(lambda: write(point + rel + "/pids.max", "max"))
            out["leave " + point] = attempt(lambda: write(point + "/cgroup.procs", str(os.getpid())))
        out["cgroup"] = open("/proc/self/cgroup").read()
        return out
"""


async def test_a_worker_cannot_signal_the_kernel_nor_lift_its_process_limit(
    harness: Any, level: str
) -> None:
    # a root kernel whose Python nobody else can read keeps its rlimits workers root
    # (without capabilities): such a worker could SIGKILL the kernel, write its own
    # pids.max and move itself out of its pids cgroup
    h = await harness(level)
    write_plugin(h.plugins, "breakout", info=sandboxed("breakout"), router=ESCAPE)
    assert (await h.reload("breakout")).status_code == 200
    r = await h.client.get("/app/breakout/escape", params={"kernel": os.getpid()})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["signal"].startswith("refused"), out
    for key, value in out.items():
        if key.startswith(("raise ", "leave ")):
            assert value.startswith("refused"), out
    described = h.service.describe("breakout")
    assert described is not None
    if described["process_limit"] == "pids-cgroup":
        assert "xcore-sandbox-" in out["cgroup"], out


TMPFS = """
    import os
    from fastapi import APIRouter
    router = APIRouter()

    @router.get("/sizes")
    def sizes(hidden: str):
        out = {}
        for path in ("/tmp", hidden):
            st = os.statvfs(path)
            out[path] = st.f_blocks * st.f_frsize
        return out
"""


async def test_the_private_tmp_cannot_hold_more_than_the_memory_limit(
    harness: Any, level: str
) -> None:
    # a tmpfs is memory: unbounded, a plugin could fill half the machine's RAM through its
    # private /tmp, past its own memory limit
    if level != "bwrap":
        pytest.skip("the rlimits level has no private /tmp")
    h = await harness(level)
    info = sandboxed("tmpfill", limits={"memory": "256m"})
    write_plugin(h.plugins, "tmpfill", info=info, router=TMPFS)
    assert (await h.reload("tmpfill")).status_code == 200
    hidden = str((h.base / "var").resolve())
    r = await h.client.get("/app/tmpfill/sizes", params={"hidden": hidden})
    assert r.status_code == 200, r.text
    assert r.json()["/tmp"] <= 256 * 1024 * 1024
    # the tmpfs that hides the kernel's data folder holds nothing either
    assert r.json()[hidden] <= 1024 * 1024


PEEK = """
    from fastapi import APIRouter
    router = APIRouter()

    @router.get("/peek")
    def peek(path: str):
        try:
            with open(path) as f:
                return {"read": f.read()}
        except OSError as exc:
            return {"refused": exc.strerror}
"""


@pytest.fixture
def outside_tmp() -> Iterator[Path]:
    """A folder outside /tmp and the home folders (which bubblewrap hides anyway), as
    a production plugins folder is."""
    base = Path(tempfile.mkdtemp(prefix="xcore-peek-", dir="/var/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def test_other_plugins_folders_are_hidden_at_the_namespace_level(
    level: str, outside_tmp: Path
) -> None:
    if level != "bwrap":
        pytest.skip("the rlimits level has no file-system namespace")
    h = Harness(outside_tmp, level)
    try:
        with anyio.fail_after(60):
            await h.start()
        write_plugin(h.plugins, "keeper", config="api_key: hunter2-secret\n")
        write_plugin(h.plugins, "peeker", info=sandboxed("peeker"), router=PEEK)
        assert (await h.reload("peeker")).status_code == 200
        own = await h.client.get(
            "/app/peeker/peek", params={"path": str(h.plugins / "peeker" / "router.py")}
        )
        assert "def peek" in own.json().get("read", ""), own.text
        other = await h.client.get(
            "/app/peeker/peek", params={"path": str(h.plugins / "keeper" / "config.yaml")}
        )
        assert other.status_code == 200, other.text
        assert "hunter2" not in other.text
        assert "refused" in other.json()
    finally:
        with anyio.fail_after(60):
            await h.stop()


SCRIBBLE = """
    import os
    from fastapi import APIRouter
    router = APIRouter()

    @router.get("/scribble")
    def scribble(paths: str):
        out = {}
        for path in paths.split(","):
            try:
                with open(path, "a") as f:
                    f.write("# injected\\n")
                out[path] = "written"
            except OSError as exc:
                out[path] = f"refused: {exc.strerror}"
        return out
"""


async def test_a_worker_writes_only_in_its_data_folder(level: str, outside_tmp: Path) -> None:
    # a worker that keeps root's file access (rlimits level, Python private to root) could
    # write the log, the kernel's code, a trusted plugin's code (run by the kernel at its
    # next reload)
    h = Harness(outside_tmp, level)
    try:
        with anyio.fail_after(60):
            await h.start()
        write_plugin(h.plugins, "trusting", info={"version": "1.0.0"})
        write_plugin(h.plugins, "scribbler", info=sandboxed("scribbler"), router=SCRIBBLE)
        assert (await h.reload("scribbler")).status_code == 200
        own = outside_tmp / "var" / "plugins" / "scribbler" / "notes.txt"
        others = [
            outside_tmp / "var" / "evil.txt",
            h.plugins / "trusting" / "run.py",
            h.plugins / "scribbler" / "router.py",
        ]
        r = await h.client.get(
            "/app/scribbler/scribble", params={"paths": ",".join(map(str, [own, *others]))}
        )
        assert r.status_code == 200, r.text
        out = r.json()
        assert out.pop(str(own)) == "written", out
        assert all(v.startswith("refused") for v in out.values()), out
        assert "injected" not in (h.plugins / "trusting" / "run.py").read_text()
    finally:
        with anyio.fail_after(60):
            await h.stop()


BREAKER = """
    import gc
    import os
    import struct
    from fastapi import APIRouter
    router = APIRouter()

    @router.get("/garbage")
    async def garbage():
        wire = next(o for o in gc.get_objects() if type(o).__name__ == "Wire")
        os.write(wire.fd, struct.pack(">II", 14, 10) + b"not json!!")
        return {"sent": True}

    @router.get("/burn")
    def burn():
        while True:
            pass
"""

IGNORE_SIGXCPU = """
    import signal


    async def on_load(ctx):
        signal.signal(signal.SIGXCPU, signal.SIG_IGN)  # the soft CPU limit is ignored
"""


async def test_a_worker_killed_for_a_malformed_frame_is_recorded_with_why(harness: Any) -> None:
    h = await harness("rlimits")
    write_plugin(h.plugins, "breaker", info=sandboxed("breaker"), router=BREAKER)
    assert (await h.reload("breaker")).status_code == 200
    r = await h.client.get("/app/breaker/garbage")
    assert r.status_code == 502, r.text
    [crashed] = await h.wait_for("SandboxCrashed", "breaker")
    assert "malformed frame" in crashed.data["detail"], crashed.data
    assert "malformed frame" in r.json()["detail"]


async def test_a_worker_ignoring_sigxcpu_is_recorded_at_the_cpu_limit(harness: Any) -> None:
    h = await harness("rlimits")
    info = sandboxed("burner", limits={"cpu": "5s", "wall_time": "120s"})
    write_plugin(h.plugins, "burner", info=info, router=BREAKER, run=IGNORE_SIGXCPU)
    assert (await h.reload("burner")).status_code == 200
    r = await h.client.get("/app/burner/burn")
    assert r.status_code == 502, r.text
    [breach] = await h.wait_for("SandboxLimitExceeded", "burner")
    assert breach.data["limit"] == "cpu", breach.data
    assert not await h.events("SandboxCrashed", plugin="burner")


HIJACK = """
    import gc

    # the plugin owns its worker process: it rewrites the ready frame's mount prefix
    wire = next(o for o in gc.get_objects() if type(o).__name__ == "Wire")
    original = type(wire).send


    def send(self, header, payload=b"", **kwargs):
        if header.get("op") == "ready":
            header["prefix"] = "/hijacked"
        return original(self, header, payload, **kwargs)


    type(wire).send = send
"""


async def test_a_worker_cannot_mount_its_routes_outside_its_manifests_prefix(
    harness: Any,
) -> None:
    h = await harness("rlimits")
    write_plugin(h.plugins, "hijack", info=sandboxed("hijack"), run=HIJACK, router=SLOW)
    r = await h.reload("hijack")
    assert r.status_code == 422, r.text
    assert "/hijacked" in r.json()["detail"], r.text
    assert (await h.client.get("/hijacked/ok")).status_code == 404


FORGED_DOCS = """
    import gc

    wire = next(o for o in gc.get_objects() if type(o).__name__ == "Wire")
    original = type(wire).send


    def send(self, header, payload=b"", **kwargs):
        if header.get("op") == "ready" and header.get("openapi"):
            header["openapi"]["paths"]["/admin/forged"] = {"get": {"summary": "forged"}}
        return original(self, header, payload, **kwargs)


    type(wire).send = send
"""


async def test_a_workers_openapi_fragment_documents_only_its_own_paths(harness: Any) -> None:
    h = await harness("rlimits")
    write_plugin(h.plugins, "forger", info=sandboxed("forger"), run=FORGED_DOCS, router=SLOW)
    assert (await h.reload("forger")).status_code == 200
    schema = (await h.client.get("/openapi.json")).json()
    assert "/app/forger/ok" in schema["paths"]
    assert "/admin/forged" not in schema["paths"]


async def test_the_boot_log_gives_a_sandboxed_plugins_real_load_time(
    harness: Any, base: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # it was measured from 0 (the machine's uptime): "loaded in 23184391.5 ms"
    write_plugin(base / "plugins", "timed", info=sandboxed("timed"), router=SLOW)
    with caplog.at_level(logging.INFO, logger="xcore.loader"):
        before = time.perf_counter()
        await harness("rlimits")
        elapsed_ms = (time.perf_counter() - before) * 1000
    [line] = [
        r.getMessage() for r in caplog.records if "'timed': generation 1 loaded" in r.getMessage()
    ]
    took = float(line.rsplit(" in ", 1)[1].removesuffix(" ms"))
    assert 0 < took <= elapsed_ms, line  # within the start, not since the machine's boot


def test_giving_the_data_folder_to_the_workers_user_follows_no_link(base: Path) -> None:
    # the folder is the plugin's: links in it (swapped in while a root kernel walks it)
    # must never make root give a file outside the folder to the workers' user
    if os.getuid() != 0:
        pytest.skip("only a root kernel changes owners")
    from services.sandbox.service import _chown_tree

    outside = base / "outside"
    outside.mkdir()
    (outside / "secret").write_text("root's")
    data = base / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "own").write_text("")
    (data / "file-link").symlink_to(outside / "secret")
    (data / "dir-link").symlink_to(outside)
    _chown_tree(data, 65534, 65534)
    assert (data / "sub" / "own").stat().st_uid == 65534
    assert (outside / "secret").stat().st_uid == 0
    assert outside.stat().st_uid == 0


CLAIMER_RUN = """
    from kernel.events import Event


    class SbClaimed(Event):  # a name only these tests use (the kernel's registry is global)
        n: int
"""

CLAIMER_ROUTER = """
    from fastapi import APIRouter
    from kernel.sdk import current_plugin
    from .run import SbClaimed

    router = APIRouter()

    @router.post("/emit")
    async def emit():
        try:
            await current_plugin().append(SbClaimed(n=1))
        except PermissionError as exc:
            return {"refused": str(exc)}
        return {"recorded": True}
"""


async def test_a_sandboxed_plugin_cannot_forge_another_sandboxed_plugins_event_type(
    harness: Any,
) -> None:
    h = await harness("rlimits")
    for name in ("alpha", "beta"):
        info = sandboxed(name)
        write_plugin(h.plugins, name, info=info, run=CLAIMER_RUN, router=CLAIMER_ROUTER)
        assert (await h.reload(name)).status_code == 200
    assert (await h.client.post("/app/alpha/emit")).json() == {"recorded": True}
    forged = (await h.client.post("/app/beta/emit")).json()
    assert "alpha" in forged.get("refused", ""), forged
    assert [r.stream for r in await h.events("SbClaimed")] == ["plugin-alpha"]
    # its owner keeps appending it
    assert (await h.client.post("/app/alpha/emit")).json() == {"recorded": True}


DEAF = """
    import asyncio
    import gc
    import threading
    from fastapi import APIRouter
    router = APIRouter()

    @router.get("/ok")
    async def ok():
        return {"ok": True}

    @router.get("/deaf")
    async def deaf():
        wire = next(o for o in gc.get_objects() if type(o).__name__ == "Wire")
        server = next(o for o in gc.get_objects() if type(o).__name__ == "Server")
        # stop reading the kernel's frames, and ask for answers it cannot take
        asyncio.get_running_loop().remove_reader(server.in_fd)

        def flood():
            for n in range(30_000):  # answers enough to fill the pipe
                frame = {"op": "append", "id": n, "stream": "nope", "type": "X", "schema": 1}
                wire.send(frame, b"{}")

        threading.Thread(target=flood, daemon=True).start()
        return {"deaf": True}
"""


async def test_a_worker_that_stops_reading_its_pipe_is_still_watched(harness: Any) -> None:
    # the watchdog's ping waited for the full pipe to drain: heartbeat and wall time were
    # no longer enforced, calls hung, and refused asks piled up in the kernel's memory
    h = await harness("rlimits")
    write_plugin(h.plugins, "deaf", info=sandboxed("deaf"), router=DEAF)
    assert (await h.reload("deaf")).status_code == 200
    assert (await h.client.get("/app/deaf/deaf")).status_code == 200
    with anyio.fail_after(60):
        while not (
            await h.events("SandboxLimitExceeded", plugin="deaf")
            or await h.events("SandboxCrashed", plugin="deaf")
        ):
            await anyio.sleep(0.1)
    await h.wait_for("SandboxRestarted", "deaf")
    with anyio.fail_after(60):
        while (await h.client.get("/app/deaf/ok")).status_code != 200:
            await anyio.sleep(0.1)


UNCALLED = """
    import asyncio
    import gc
    from fastapi import APIRouter
    router = APIRouter()

    @router.get("/ok")
    async def ok():
        return {"ok": True}

    @router.get("/vanish")
    async def vanish():
        server = next(o for o in gc.get_objects() if type(o).__name__ == "Server")
        me = asyncio.current_task()
        [cid] = [c for c, task in server.calls.items() if task is me]
        # a cancel nobody asked for, 'honoured': the kernel forgot the call (and its
        # wall time) while its client waited for an answer that could no longer come
        server.wire.send({"op": "cancelled", "id": cid, "honoured": True})
        await asyncio.sleep(0.2)
        return {"answered": True}
"""


async def test_a_forged_cancel_cannot_make_a_call_escape_its_wall_time(harness: Any) -> None:
    h = await harness("rlimits")
    info = sandboxed("vanisher", limits={"wall_time": "3s"})
    write_plugin(h.plugins, "vanisher", info=info, router=UNCALLED)
    assert (await h.reload("vanisher")).status_code == 200
    with anyio.fail_after(60):
        r = await h.client.get("/app/vanisher/vanish")
    assert r.status_code == 200, r.text
    assert r.json() == {"answered": True}
