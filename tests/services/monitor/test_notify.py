"""A webhook sink leaves no stream open, whether or not its delivery worker ran."""

from __future__ import annotations

import gc
import warnings
from typing import Any

import anyio

from services.monitor.notify import Webhook
from services.monitor.settings import WebhookSettings


def _collected_warnings(make: Any) -> list[str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        make()
        gc.collect()
    return [str(w.message) for w in seen if issubclass(w.category, ResourceWarning)]


def test_a_hook_closed_before_its_worker_ran_leaves_no_stream_open() -> None:
    def make() -> None:
        hook = Webhook(None, WebhookSettings(url="http://127.0.0.1:9/"), 4)  # type: ignore[arg-type]
        hook.close()

    assert _collected_warnings(make) == []


def test_a_hook_whose_worker_was_cancelled_leaves_no_stream_open() -> None:
    async def scenario() -> None:
        hook = Webhook(None, WebhookSettings(url="http://127.0.0.1:9/"), 4)  # type: ignore[arg-type]
        async with anyio.create_task_group() as tg:
            tg.start_soon(hook.run)
            await anyio.sleep(0.05)
            hook.close()  # as the monitor stops: close, then cancel the worker
            tg.cancel_scope.cancel()
        await hook.run()  # a worker started after the close ends at once

    def make() -> None:
        anyio.run(scenario)

    assert _collected_warnings(make) == []
