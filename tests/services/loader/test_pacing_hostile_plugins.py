"""Plugins that fight pacing's fine-yield hook (kernel/pacing.py) during a paced reload:
their own profiler, a profiler they remove, an exception raised from inside a profiled
call, threads declaring routes during the import. Each reload ends (loaded, or refused
with the plugin's own error), the old generation keeps serving when refused, and the
window closes behind it."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest

from kernel import pacing

from .conftest import AUTH, write_plugin

FILLER = "".join(f"x{i} = {i}\n" for i in range(120))  # (parsed and run in pieces)

HOSTILE = {
    "own-profiler": (
        "import sys\n"
        "calls = []\n"
        "sys.setprofile(lambda f, e, a: calls.append(e))\n" + FILLER + "sys.setprofile(None)\n",
        200,
    ),
    "drops-the-hook": ("import sys\n" + FILLER + "sys.setprofile(None)\n" + FILLER, 200),
    "raises-in-a-call": (
        FILLER + "def boom():\n    raise LookupError('hostile')\n" + FILLER + "boom()\n",
        422,
    ),
    "threads-declaring-routes": (
        "import threading\n"
        + FILLER
        + "def more():\n"
        + "    for i in range(50):\n"
        + "        router.add_api_route(f'/t{i}', lambda: {'t': 1}, methods=['GET'])\n"
        + "ts = [threading.Thread(target=more) for _ in range(3)]\n"
        + "[t.start() for t in ts]\n"
        + "[t.join() for t in ts]\n",
        200,
    ),
    "generators": (
        FILLER + "def g():\n    for i in range(1000):\n        yield i\nTOTAL = sum(g())\n",
        200,
    ),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
async def test_a_hostile_plugin_reload_ends_and_closes_the_window(
    harness_factory: Any, plugins: Path, kind: str
) -> None:
    body, status = HOSTILE[kind]
    base = 'from fastapi import APIRouter\nrouter = APIRouter()\n@router.get("/v")\ndef v():\n    return {"v": 1}\n'
    folder = write_plugin(
        plugins, "hostile", info={"version": "1.0.0", "api_prefix": "/app/hostile"}
    )
    (folder / "router.py").write_text(base)
    h = await harness_factory()
    assert (await h.client.get("/app/hostile/v")).json() == {"v": 1}
    (folder / "router.py").write_text(base.replace('{"v": 1}', '{"v": 2}') + textwrap.dedent(body))
    epoch = pacing._epoch
    with anyio.fail_after(60):
        r = await h.client.post("/admin/plugins/hostile/reload", headers=AUTH)
    assert r.status_code == status, r.text
    if status == 422:
        assert "hostile" in r.text
    expected = 2 if status == 200 else 1
    assert (await h.client.get("/app/hostile/v")).json() == {"v": expected}
    assert pacing._epoch > epoch  # (the reload was paced)
    assert pacing.share() == 1.0
    assert sys.getprofile() is None
    await h.stop()
