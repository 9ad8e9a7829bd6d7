"""A full disk on a small real file system: no outcome lost, health says so, 503s.

A tmpfs of a few MiB is mounted for the test (root only; skipped elsewhere), the kernel's
log lives on it, and a filler file takes the rest of the space.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from fastapi import APIRouter, FastAPI

from kernel import Kernel, Recorded, RetryPolicy, Settings
from kernel.events import NewEvent


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(folder: Path) -> Path:
    """Take every free byte of ``folder``'s file system."""
    filler = folder / "filler"
    chunk = b"\0" * 65536
    with filler.open("wb") as f:
        while True:
            try:
                f.write(chunk)
                f.flush()
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    with contextlib.suppress(OSError), filler.open("ab") as f:
        while True:  # the last partial block
            f.write(b"\0" * 512)
            f.flush()
    return filler


async def test_a_full_disk_stalls_a_subscriber_instead_of_losing_its_outcome(
    small_fs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="xcore")
    settings = Settings(data_dir=small_fs / "var", node="full")
    async with Kernel(settings, services=[]) as kernel:
        app = FastAPI()
        admin = APIRouter()

        @admin.post("/write")
        async def write() -> dict[str, int]:
            [r] = await kernel.append(NewEvent.raw("Written", {}), stream="admin")
            return {"position": r.position}

        kernel.http.add_admin_router(admin)
        kernel.http.set_admin_guard(lambda: None)

        async def anyone(request: object) -> None:
            return None

        kernel.http.set_admin_authenticator(anyone)
        kernel.http.attach(app, kernel)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")

        go = asyncio.Event()
        tries: list[int] = []

        async def answer(r: Recorded) -> None:
            await go.wait()
            tries.append(r.position)
            # an outcome too big for what is left on the disk
            await kernel.append(
                [NewEvent.raw("JobDone", {"blob": "x" * 256 * 1024})], stream="jobs"
            )

        sub = await kernel.subscribe(
            answer,
            name="answer",
            types=["Job"],
            retry=RetryPolicy(max_attempts=2, first_delay=0.01, max_delay=0.05),
        )
        [job] = await kernel.append(NewEvent.raw("Job", {}), stream="jobs")
        filler = fill(small_fs)
        go.set()
        with anyio.fail_after(30):
            while len(tries) < 6:  # failed, gave up, could not record it, tried again...
                await asyncio.sleep(0.01)
        assert sub.position < job.position, "the subscriber moved past an unanswered event"
        ok, details = kernel.store.health()
        assert not ok and "disk is full" in details["error"]
        health = await client.get("/health")
        assert health.status_code == 503
        assert "store" in health.json()["failing"]  # the reason itself is behind a token
        assert health.json()["components"]["store"]["ok"] is False
        refused = await client.post("/admin/write")
        assert refused.status_code == 503
        assert "disk is full" in refused.json()["detail"]
        # each failed write is logged where the operator looks, naming the log's file
        written = [r.getMessage() for r in caplog.records if r.name == "xcore.store"]
        assert any(
            m.startswith(f"event log write failed on {settings.database_path}") and "full" in m
            for m in written
        ), written

        filler.unlink()  # space again: the subscriber resumes where it stood
        with anyio.fail_after(30):
            while not await kernel.read(types=["JobDone", "SubscriberFailed"]):
                await asyncio.sleep(0.01)
            await sub.wait_for(job.position)
        assert (await client.get("/health")).status_code == 200
        assert (await client.post("/admin/write")).status_code == 200
        await client.aclose()
