"""An alert episode: one AlertRaised and one signed webhook call for repeated failures;
a success resolves it; a webhook that keeps failing is recorded as NotificationFailed."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.scheduler.events import TaskFailed, TaskSucceeded
from tests.services.monitor.conftest import AUTH, monitored

pytestmark = pytest.mark.anyio

SECRET = "webhook-secret-for-the-test"


@contextmanager
def receiver(status: int = 200) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A real HTTP server on a free loopback port recording every POST."""
    calls: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            calls.append({"headers": dict(self.headers), "body": body})
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", calls
    finally:
        server.shutdown()
        server.server_close()


async def _fail(kernel: Any, task: str, n: int) -> None:
    await kernel.append(
        TaskFailed(task=task, run_id=f"r{n}", attempt=1, error=f"boom {n}"), stream=f"task-{task}"
    )


async def _events(kernel: Any, type_name: str) -> list[Any]:
    return await kernel.read(types=[type_name])


async def _wait(predicate: Any, timeout: float = 30) -> None:
    with anyio.fail_after(timeout):
        while not await predicate():
            await anyio.sleep(0.02)


async def test_an_episode_raises_once_notifies_signed_and_resolves(tmp_path: Path) -> None:
    with receiver() as (url, calls):
        alerts = {
            "rules": [
                {"name": "jobs-failing", "kind": "task_failures", "threshold": 3, "window": 600}
            ],
            "webhooks": [{"url": url, "secret": SECRET, "retries": 0}],
        }
        async with monitored(tmp_path, monitor={"alerts": alerts}) as m:
            k = m.kernel
            for n in range(2):
                await _fail(k, "jobs.collect", n)
            await k.settle()
            await anyio.sleep(0.3)
            assert await _events(k, "AlertRaised") == []  # below the threshold
            for n in range(2, 8):
                await _fail(k, "jobs.collect", n)

            async def raised() -> bool:
                return len(await _events(k, "AlertRaised")) == 1 and len(calls) == 1

            await _wait(raised)
            await _fail(k, "jobs.collect", 99)  # still the same episode
            await k.append(
                TaskSucceeded(task="jobs.collect", run_id="ok", attempt=1, duration_ms=1.0),
                stream="task-jobs.collect",
            )

            async def resolved() -> bool:
                return len(await _events(k, "AlertResolved")) == 1 and len(calls) == 2

            await _wait(resolved)
            [alert] = await _events(k, "AlertRaised")
            assert alert.data["key"] == "jobs-failing:jobs.collect"
            assert alert.data["count"] == 3
            assert len(await _events(k, "AlertRaised")) == 1  # once per episode
            body = (await m.client.get("/admin/alerts", headers=AUTH)).json()
            assert body["open"] == []
            assert body["recent"][0]["key"] == alert.data["key"]
            assert body["recent"][0]["resolution"] == "the task succeeded"

    for call, expected in zip(calls, ("AlertRaised", "AlertResolved"), strict=True):
        headers = {k.lower(): v for k, v in call["headers"].items()}
        mac = hmac.new(
            SECRET.encode(),
            headers["x-xcore-timestamp"].encode() + b"." + call["body"],
            hashlib.sha256,
        )
        assert headers["x-xcore-signature"] == "sha256=" + mac.hexdigest()
        payload = json.loads(call["body"])
        assert payload["type"] == expected == headers["x-xcore-event"]
        assert payload["data"]["key"] == "jobs-failing:jobs.collect"


async def test_a_failing_webhook_is_recorded_and_never_blocks(tmp_path: Path) -> None:
    with receiver(status=500) as (url, calls):
        alerts = {
            "rules": [{"name": "load", "kind": "plugin_load_failed", "threshold": 1}],
            "webhooks": [{"url": url, "secret": SECRET, "retries": 2, "backoff": 0.01}],
        }
        async with monitored(tmp_path, monitor={"alerts": alerts}) as m:
            k = m.kernel
            from services.loader.events import PluginLoadFailed

            started = time.monotonic()
            await k.append(
                PluginLoadFailed(name="broken", stage="import", error="SyntaxError"),
                stream="plugin-broken",
            )
            assert time.monotonic() - started < 5  # the append never waits for the webhook

            async def recorded() -> bool:
                return len(await _events(k, "NotificationFailed")) == 1

            await _wait(recorded)
            [failed] = await _events(k, "NotificationFailed")
            assert failed.data["attempts"] == 3 and failed.data["error"] == "HTTP 500"
            assert failed.data["event_type"] == "AlertRaised"
            assert failed.data["sink"].startswith("webhook http://127.0.0.1:")
            assert len(calls) == 3
            metrics = {
                (s.name, tuple(s.labels.items())): s.value
                for family in text_string_to_metric_families((await m.client.get("/metrics")).text)
                for s in family.samples
            }
            assert metrics[("xcore_notifications_failed_total", (("sink", "webhook"),))] == 1
            assert metrics[("xcore_alerts_raised_total", (("rule", "load"),))] == 1


async def test_a_webhook_trickling_an_endless_answer_fails_within_its_timeout(
    tmp_path: Path,
) -> None:
    """A hostile receiver sends its headers, then one byte of body at a time, forever:
    each read is within httpx's timeout, so the delivery used to hang (and buffer)."""
    import socket

    stop = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n")
            while not stop.wait(0.05):
                try:
                    conn.sendall(b"1\r\nx\r\n")
                except OSError:
                    return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/hook"
    alerts = {
        "rules": [{"name": "load", "kind": "plugin_load_failed", "threshold": 1}],
        "webhooks": [{"url": url, "retries": 0, "timeout": 1}],
    }
    try:
        async with monitored(tmp_path, monitor={"alerts": alerts}) as m:
            from services.loader.events import PluginLoadFailed

            await m.kernel.append(
                PluginLoadFailed(name="broken", stage="import", error="SyntaxError"),
                stream="plugin-broken",
            )

            async def recorded() -> bool:
                return len(await _events(m.kernel, "NotificationFailed")) == 1

            await _wait(recorded)
    finally:
        stop.set()
        listener.close()
