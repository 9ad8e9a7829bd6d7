"""The task table: what operators see in ``GET /admin/tasks``, folded from task events.

Per task: its plugin, trigger, next run, whether it is scheduled and paused, counts,
mean duration, the latest runs, the runs in progress and the retries pending. The
scheduler service reads it at boot to rebuild its timers (next runs, paused tasks,
pending retries) and to settle the runs a dead process left in progress: failed as
interrupted, or released (``TaskReleased``) when their instant had not come.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kernel.events import Recorded
from kernel.projections import Projection, handles

__all__ = ["RECENT_RUNS", "RunInfo", "TaskRow", "TaskTable", "iso"]

#: How many finished runs each row keeps.
RECENT_RUNS = 20


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    try:
        return datetime.fromtimestamp(ts, UTC).isoformat()
    except (OverflowError, ValueError, OSError):
        # a time no datetime can show (recorded before such times were refused): the
        # number itself, rather than a failing admin table
        return repr(ts)


@dataclass
class RunInfo:
    run_id: str
    scheduled_for: float
    #: when it was claimed, then its code's real start (from the outcome); None for a
    #: released run (its code never ran)
    started_at: float | None
    attempt: int
    trigger: str
    outcome: str = "running"
    finished_at: float | None = None
    duration_ms: float | None = None
    error: str | None = None
    #: The node that claimed the run (its ``TaskStarted``'s meta), in a cluster.
    node: str | None = None
    #: how late the code really started (from the outcome event; None before it)
    lateness_ms: float | None = None
    #: when its code was to start at the earliest (its due time; a retry's ``retry_at``)
    due: float | None = None
    #: the event id of its ``TaskStarted`` (its claim key)
    claim: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "scheduled_for": iso(self.scheduled_for),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "attempt": self.attempt,
            "trigger": self.trigger,
            "outcome": self.outcome,
            "duration_ms": self.duration_ms,
            "lateness_ms": self.lateness_ms,
            "error": self.error,
            "node": self.node,
        }


@dataclass
class TaskRow:
    id: str
    plugin: str = ""
    generation: int = 0
    trigger: str = ""
    next_run: float | None = None
    priority: int = 0
    depends_on: list[str] = field(default_factory=list)
    scheduled: bool = False
    paused: bool = False
    rejected: str | None = None
    successes: int = 0
    failures: int = 0
    failed_attempts: int = 0
    skipped: int = 0
    missed: int = 0
    total_duration_ms: float = 0.0
    #: lateness of the runs whose outcome recorded their real start
    timed_runs: int = 0
    total_lateness_ms: float = 0.0
    max_lateness_ms: float | None = None
    source: str = "declared"
    last: RunInfo | None = None
    runs: deque[RunInfo] = field(default_factory=lambda: deque(maxlen=RECENT_RUNS))
    running: dict[str, RunInfo] = field(default_factory=dict)
    #: run id -> (attempt, retry_at, scheduled_for)
    retries: dict[str, tuple[int, float, float]] = field(default_factory=dict)

    @property
    def mean_duration_ms(self) -> float | None:
        finished = self.successes + self.failures
        return self.total_duration_ms / finished if finished else None

    def summary(self) -> dict[str, Any]:
        last = self.last
        return {
            "id": self.id,
            "plugin": self.plugin,
            "generation": self.generation,
            "trigger": self.trigger,
            "next_run": iso(self.next_run),
            "last_run": iso(last.started_at) if last else None,
            "last_outcome": last.outcome if last else None,
            "successes": self.successes,
            "failures": self.failures,
            "skipped": self.skipped,
            "missed": self.missed,
            "mean_duration_ms": self.mean_duration_ms,
            "last_lateness_ms": last.lateness_ms if last else None,
            "mean_lateness_ms": (
                self.total_lateness_ms / self.timed_runs if self.timed_runs else None
            ),
            "max_lateness_ms": self.max_lateness_ms,
            "source": self.source,
            "paused": self.paused,
            "scheduled": self.scheduled,
            "running": len(self.running),
            "priority": self.priority,
            "depends_on": list(self.depends_on),
            "rejected": self.rejected,
        }

    def detail(self) -> dict[str, Any]:
        out = self.summary()
        running = [r.to_dict() for r in self.running.values()]
        out["recent_runs"] = running + [r.to_dict() for r in reversed(self.runs)]
        out["pending_retries"] = [
            {"run_id": rid, "attempt": a, "retry_at": iso(at)}
            for rid, (a, at, _) in self.retries.items()
        ]
        return out


class TaskTable(Projection):
    """Every task the log knows, by id (``plugin.task``)."""

    name = "scheduler.tasks"

    def reset(self) -> None:
        self.tasks: dict[str, TaskRow] = {}
        #: claim keys given up by ``TaskReleased``: the instant claims again under a key
        #: derived from each (``claim.claim_key``)
        self.released: set[str] = set()

    def row(self, task_id: str) -> TaskRow:
        row = self.tasks.get(task_id)
        if row is None:
            row = self.tasks[task_id] = TaskRow(id=task_id)
        return row

    @handles("TaskScheduled")
    def _scheduled(self, r: Recorded) -> None:
        d = r.data
        row = self.row(d["task"])
        row.plugin = d["plugin"]
        row.generation = d["generation"]
        row.trigger = d["trigger"]
        row.next_run = d["next_run"]
        row.priority = d.get("priority", 0)
        row.depends_on = list(d.get("depends_on", ()))
        row.source = d.get("source", "declared")
        row.scheduled = True
        row.rejected = None

    @handles("TaskUnscheduled")
    def _unscheduled(self, r: Recorded) -> None:
        row = self.row(r.data["task"])
        row.scheduled = False

    @handles("TaskRejected")
    def _rejected(self, r: Recorded) -> None:
        d = r.data
        row = self.row(d["task"])
        row.plugin = d["plugin"]
        row.generation = d["generation"]
        row.rejected = d["reason"]
        row.scheduled = False

    @handles("TaskStarted")
    def _started(self, r: Recorded) -> None:
        d = r.data
        row = self.row(d["task"])
        run_id = d["run_id"]
        trigger = d.get("trigger", "schedule")
        pending = row.retries.pop(run_id, None)
        info = RunInfo(
            run_id=run_id,
            scheduled_for=d["scheduled_for"],
            started_at=r.timestamp,
            attempt=d.get("attempt", 1),
            trigger=trigger,
            node=r.meta.node,
            due=pending[1] if pending is not None and trigger == "retry" else d["scheduled_for"],
            claim=r.meta.id,
        )
        row.running[run_id] = info
        row.last = info
        row.next_run = d.get("next_run")

    def _finish(self, r: Recorded, outcome: str) -> RunInfo:
        d = r.data
        row = self.row(d["task"])
        info = row.running.pop(d["run_id"], None)
        if info is None:
            info = RunInfo(d["run_id"], r.timestamp, r.timestamp, d.get("attempt", 1), "unknown")
        info.outcome = outcome
        info.finished_at = r.timestamp
        info.duration_ms = d.get("duration_ms")
        if d.get("started_at") is not None:
            # the real start (TaskStarted is written ahead of it on purpose)
            info.started_at = d["started_at"]
            lateness = d.get("lateness_ms")
            if lateness is None:
                lateness = max(0.0, d["started_at"] - info.scheduled_for) * 1000
            info.lateness_ms = lateness
            row.timed_runs += 1
            row.total_lateness_ms += lateness
            row.max_lateness_ms = max(row.max_lateness_ms or 0.0, lateness)
        row.runs.append(info)
        row.last = info
        return info

    @handles("TaskSucceeded")
    def _succeeded(self, r: Recorded) -> None:
        self._finish(r, "succeeded")
        row = self.tasks[r.data["task"]]
        row.successes += 1
        row.total_duration_ms += r.data["duration_ms"]

    @handles("TaskFailed")
    def _failed(self, r: Recorded) -> None:
        d = r.data
        retrying = d.get("will_retry", False)
        info = self._finish(r, "retrying" if retrying else "failed")
        info.error = d["error"]
        row = self.tasks[d["task"]]
        row.failed_attempts += 1
        if not retrying:
            row.failures += 1
            row.total_duration_ms += d.get("duration_ms", 0.0)

    @handles("TaskReleased")
    def _released(self, r: Recorded) -> None:
        d = r.data
        row = self.row(d["task"])
        self.released.add(d["claim"])
        info = row.running.pop(d["run_id"], None)
        if info is None:
            info = RunInfo(d["run_id"], d["scheduled_for"], r.timestamp, d["attempt"], "unknown")
        info.outcome = "released"
        info.started_at = None  # claimed ahead; its code never ran (as in the runs list)
        info.finished_at = r.timestamp
        info.error = d["reason"]
        # the task's last outcome stays that of its last run whose code ran
        row.last = next((x for x in reversed(row.runs) if x.outcome != "released"), None)
        row.runs.append(info)
        row.next_run = d.get("next_run")
        if d.get("retry_at") is not None:  # pending again
            row.retries[d["run_id"]] = (d["attempt"], d["retry_at"], d["scheduled_for"])

    @handles("TaskRetryScheduled")
    def _retry(self, r: Recorded) -> None:
        d = r.data
        self.row(d["task"]).retries[d["run_id"]] = (d["attempt"], d["retry_at"], d["scheduled_for"])

    @handles("TaskSkipped")
    def _skipped(self, r: Recorded) -> None:
        d = r.data
        row = self.row(d["task"])
        row.skipped += 1
        row.next_run = d.get("next_run")
        if d.get("run_id"):
            row.retries.pop(d["run_id"], None)

    @handles("TaskMissed")
    def _missed(self, r: Recorded) -> None:
        d = r.data
        row = self.row(d["task"])
        row.missed += d["count"]
        row.next_run = d.get("next_run")

    @handles("TaskPaused")
    def _paused(self, r: Recorded) -> None:
        self.row(r.data["task"]).paused = True

    @handles("TaskResumed")
    def _resumed(self, r: Recorded) -> None:
        row = self.row(r.data["task"])
        row.paused = False
        row.next_run = r.data.get("next_run")
