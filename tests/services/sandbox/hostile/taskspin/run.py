"""An endless loop in a task that has a timeout (sync code: cannot be cancelled)."""

from kernel.sdk import task

PLUGIN_INFO = {"version": "1.0.0", "api_prefix": "/app/taskspin", "mode": "sandboxed"}


@task(cron="0 0 1 1 *", timeout=1)
def attack() -> None:
    while True:
        pass
