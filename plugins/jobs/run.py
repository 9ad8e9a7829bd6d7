"""jobs: a periodic async task, a sync task, and a task that depends on another.

``make run`` loads it; ``GET /admin/tasks`` (or ``xcore task list``) shows the three
tasks running: ``jobs.heartbeat`` every 10 s, ``jobs.collect`` every minute in a
worker thread, and ``jobs.report`` after each successful ``collect``.
"""

from __future__ import annotations

import time

from kernel.sdk import current_task, task

PLUGIN_INFO = {"version": "1.0.0", "author": "xcore", "api_prefix": "/app/jobs"}

#: Counted by ``collect`` and read by ``report`` and the ``/status`` route.
STATE: dict[str, float] = {"collected": 0, "last_report": 0.0}


@task(every="10s", jitter="1s")
async def heartbeat() -> None:
    ctx = current_task()
    ctx.logger.info("heartbeat (scheduled for %s)", ctx.scheduled_for.isoformat())


@task(cron="* * * * *", retries=2, retry_delay="5s", timeout="30s")
def collect() -> None:
    # sync code: the scheduler runs it in a worker thread, never on the event loop
    time.sleep(0.2)
    STATE["collected"] += 1
    current_task().logger.info("collected batch %d", STATE["collected"])


@task(depends_on="collect", priority=5)
async def report() -> None:
    STATE["last_report"] = time.time()
    current_task().logger.info("report after %d batches", STATE["collected"])
