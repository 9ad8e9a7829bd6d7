"""Run a real ``xcore serve`` in a subprocess on a free loopback port, for end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    data_dir: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def serve(
    tmp_path: Path,
    *,
    plugins_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
    args: tuple[str, ...] = (),
    timeout: float = 30.0,
) -> Iterator[Server]:
    """Start ``xcore serve`` with stdout and stderr sent to a regular file."""
    port = free_port()
    data_dir = tmp_path / "var"
    plugins = plugins_dir if plugins_dir is not None else tmp_path / "plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    log = tmp_path / f"serve-{port}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("XCORE_")}
    full_env.update(env or {})
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kernel.cli",
                "serve",
                "--port",
                str(port),
                "--data-dir",
                str(data_dir),
                "--plugins-dir",
                str(plugins),
                *args,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env=full_env,
        )
    server = Server(f"http://127.0.0.1:{port}", proc, log, data_dir)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"xcore serve exited with {proc.returncode}:\n{server.output()}")
            try:
                if httpx.get(f"{server.url}/health/live", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"xcore serve did not answer in {timeout}s:\n{server.output()}")
            time.sleep(0.05)
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
