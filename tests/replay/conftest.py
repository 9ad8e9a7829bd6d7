"""Fixtures of the replay tests: a real log written by a real kernel, and a runner for
``xcore replay ...`` in a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.replay.scenario import Story, write_story

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def private_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Replay's snapshot cache in a folder of the test's own, never in ~/.cache."""
    cache = tmp_path_factory.mktemp("replay-cache")
    monkeypatch.setenv("XCORE_REPLAY_CACHE", str(cache))
    return cache


@pytest.fixture
async def story(tmp_path: Path) -> Story:
    return await write_story(tmp_path / "var")


def run(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    """Run the ``xcore`` command line in this process (fast); output captured."""
    import contextlib
    import io

    from kernel.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:
            code = int(exc.code or 0)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def xcore(
    *args: str | os.PathLike[str],
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    user: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``xcore`` with ``args`` in a subprocess; stdout and stderr captured."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(ROOT)
    full_env.pop("NO_COLOR", None)
    if env:
        full_env.update(env)
    cmd = [sys.executable, "-m", "kernel.cli", *map(str, args)]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(
        cmd, capture_output=True, text=True, cwd=cwd or ROOT, env=full_env, timeout=timeout
    )


MANY = """
import contextlib, io, json, sys
from kernel.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = int(exc.code or 0)
    results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
sys.__stdout__.write(json.dumps(results))
"""


def xcore_many(
    commands: list[list[str | os.PathLike[str]]],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    user: int | None = None,
) -> list[subprocess.CompletedProcess[str]]:
    """Run several ``xcore`` command lines in ONE fresh process (one start-up, not many)."""
    import json

    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    argv = json.dumps([[str(a) for a in c] for c in commands])
    cmd = [sys.executable, "-c", MANY, argv]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    done = subprocess.run(
        cmd, capture_output=True, text=True, cwd=cwd or ROOT, env=full_env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return [
        subprocess.CompletedProcess(c, r["code"], r["stdout"], r["stderr"])
        for c, r in zip(commands, json.loads(done.stdout), strict=True)
    ]
