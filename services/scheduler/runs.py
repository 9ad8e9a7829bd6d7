"""A task's runs, read from its stream: what ``GET /admin/tasks/{id}/runs`` lists.

The task table keeps the last few runs of each task in memory; the full history, with
the results, lives in the log. :func:`fold_runs` folds one task's stream into its runs,
newest first: status, attempts, due time, real start, duration, lateness, and the
result or error. A result is shown while its retention lasts (``keep_result_s`` after
its outcome was recorded); after that it reads ``result_expired: true`` (the log is
append-only: the event still holds it, the API no longer shows it).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from kernel.events import Recorded
from services.scheduler.projection import iso

__all__ = ["RUN_EVENT_TYPES", "fold_runs"]

RUN_EVENT_TYPES = (
    "TaskRunAccepted",
    "TaskStarted",
    "TaskSucceeded",
    "TaskFailed",
    "TaskRetryScheduled",
    "TaskSkipped",
    "TaskReleased",
)


def fold_runs(records: Iterable[Recorded], now: float) -> list[dict[str, Any]]:
    """The runs of one task's stream, newest first."""
    runs: dict[str, dict[str, Any]] = {}
    for r in records:
        d = r.data
        run_id = d.get("run_id")
        if not run_id:
            continue
        run = runs.get(run_id)
        if run is None:
            run = runs[run_id] = {
                "run_id": run_id,
                "status": "queued",
                "trigger": None,
                "attempts": 0,
                "scheduled_for": None,
                "started_at": None,
                "finished_at": None,
                "duration_ms": None,
                "lateness_ms": None,
                "result": None,
                "error": None,
                "position": r.position,
            }
        if r.type == "TaskRunAccepted":
            run["trigger"] = "request"
            run["queue_position"] = d.get("queue_position", 0)
        elif r.type == "TaskStarted":
            run["status"] = "running"
            run["attempts"] = d.get("attempt", 1)
            run["trigger"] = run["trigger"] or d.get("trigger")
            run["scheduled_for"] = iso(d["scheduled_for"])
            run["started_at"] = iso(r.timestamp)
        elif r.type in ("TaskSucceeded", "TaskFailed"):
            run["attempts"] = d.get("attempt", run["attempts"])
            run["finished_at"] = iso(r.timestamp)
            run["duration_ms"] = d.get("duration_ms")
            if d.get("started_at") is not None:
                run["started_at"] = iso(d["started_at"])
                run["lateness_ms"] = d.get("lateness_ms")
            if r.type == "TaskSucceeded":
                run["status"] = "succeeded"
                run["error"] = None
                keep = d.get("keep_result_s")
                if d.get("result") is not None:
                    if keep is not None and r.timestamp + keep < now:
                        run["result_expired"] = True
                    else:
                        run["result"] = d["result"]
                if d.get("result_error"):
                    run["result_error"] = d["result_error"]
            else:
                run["status"] = "retrying" if d.get("will_retry") else "failed"
                run["error"] = d.get("error")
                run["failure_kind"] = d.get("kind", "error")
        elif r.type == "TaskRetryScheduled":
            run["retry_at"] = iso(d.get("retry_at"))
        elif r.type == "TaskReleased" and d.get("retry_at") is not None:
            # a retry claimed ahead, its process stopped before its time: that attempt
            # never ran and the run is not over — it is pending again at ``retry_at``
            # (read as final, ``xcore task run --wait`` gave up on a run still to retry)
            run["status"] = "retrying"
            run["attempts"] = max(0, d.get("attempt", 1) - 1)
            run["retry_at"] = iso(d["retry_at"])
        elif r.type == "TaskReleased":
            # claimed ahead, its process stopped before the instant: its code never ran
            run["status"] = "released"
            run["started_at"] = None
            run["finished_at"] = iso(r.timestamp)
            run["error"] = d.get("reason")
        elif r.type == "TaskSkipped":
            run["status"] = "skipped"
            run["error"] = d.get("reason")
            run["scheduled_for"] = run["scheduled_for"] or iso(d.get("scheduled_for"))
    return sorted(runs.values(), key=lambda x: x["position"], reverse=True)
