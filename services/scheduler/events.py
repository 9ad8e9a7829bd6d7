"""Events of the scheduler: its public contract (other services may import this).

Stream: ``task-<plugin>.<task>`` (see :func:`stream_of`) for everything about one task.
Times are UTC epoch seconds (floats): cheap to write, cheap to fold.

A run is ``TaskStarted`` then ``TaskSucceeded`` or ``TaskFailed``; a failed attempt that
will be retried is followed by ``TaskRetryScheduled`` and, later, another ``TaskStarted``
with the same ``run_id`` and the next ``attempt``. Events that move a schedule forward
carry ``next_run``, so the next due time is always in the log.

Compatibility: fields are only ever added with defaults (readers use ``.get``), so
events written by older versions read unchanged and no upcaster is needed (see
``kernel/events.py``). Added in the second round: ``TaskSucceeded``/``TaskFailed``
``started_at``, ``lateness_ms`` (the real start, as ``TaskStarted`` is written ahead),
``TaskSucceeded.result``/``result_error``/``keep_result_s``; ``TaskScheduled.coalesce``,
``source``, ``function``, ``spec``; ``TaskRunRequested.run_id`` and the
``TaskRunAccepted`` answer; ``TaskCancelRequested`` -> ``TaskCancelAnswered``;
runtime schedules (``ScheduleAdded``, ``ScheduleChanged``, ``ScheduleRemoved``,
``ScheduleConflict``).

Requests (answered with the request's correlation id, for ``kernel.request``):
``TaskRunRequested`` -> ``TaskRunAccepted{run_id, queue_position}``;
``TaskCancelRequested`` -> ``TaskCancelAnswered{status}``; any of them ->
``TaskRequestRefused`` when the task is not scheduled;
``TaskPauseRequested`` -> ``TaskPaused``; ``TaskResumeRequested`` -> ``TaskResumed``.
"""

from __future__ import annotations

from typing import Any, Literal

from kernel.events import Event

__all__ = [
    "TASK_EVENTS",
    "ScheduleAdded",
    "ScheduleApplied",
    "ScheduleChanged",
    "ScheduleConflict",
    "ScheduleRemoved",
    "TaskCancelAnswered",
    "TaskCancelRequested",
    "TaskFailed",
    "TaskMissed",
    "TaskPauseRequested",
    "TaskPaused",
    "TaskRejected",
    "TaskReleased",
    "TaskRequestRefused",
    "TaskResumeRequested",
    "TaskResumed",
    "TaskRetryScheduled",
    "TaskRunAccepted",
    "TaskRunRequested",
    "TaskScheduled",
    "TaskSkipped",
    "TaskStarted",
    "TaskSucceeded",
    "TaskUnscheduled",
    "stream_of",
]


def stream_of(task_id: str) -> str:
    """The stream of a task, e.g. ``task-hello.cleanup``."""
    return f"task-{task_id}"


class TaskScheduled(Event):
    """A task was registered (plugin load, reload, or ``SchedulerService.register``)."""

    task: str
    plugin: str
    generation: int
    #: The trigger, described (``cron '*/5 * * * *' Europe/Paris``, ``every 30s``...).
    trigger: str
    #: When it runs next (None: only after its dependencies, or never again).
    next_run: float | None
    priority: int = 0
    depends_on: list[str] = []
    max_instances: int = 1
    misfire: Literal["run_once", "skip"] = "run_once"
    coalesce: Literal["earliest", "latest", "all"] = "latest"
    #: ``declared`` (plugin code) or ``runtime`` (admin API: see ``ScheduleAdded``).
    source: Literal["declared", "runtime"] = "declared"


class TaskUnscheduled(Event):
    """A task stopped being scheduled (its plugin was unloaded, or it was unregistered)."""

    task: str
    plugin: str
    generation: int
    reason: str


class TaskRejected(Event):
    """A task declaration was refused when its plugin loaded; nothing of it is scheduled."""

    task: str
    plugin: str
    generation: int
    reason: str


class TaskStarted(Event):
    """A run (or a retry attempt of it) is about to start; recorded before the code runs."""

    task: str
    run_id: str
    scheduled_for: float
    attempt: int = 1
    #: ``schedule``, ``retry``, ``request`` (run now), ``dependency`` or ``misfire``.
    trigger: str = "schedule"
    #: The next due time of the schedule once this run was taken.
    next_run: float | None = None
    #: In a cluster: claimed by a node that is not first for the task, after its wait
    #: (a takeover). Its delay is that wait, not load: the claim lag leaves it out.
    takeover: bool = False


class TaskSucceeded(Event):
    task: str
    run_id: str
    attempt: int
    duration_ms: float
    #: When the code really started (UTC epoch seconds); None in events written before
    #: this field existed (``TaskStarted`` is written ahead of the start on purpose).
    started_at: float | None = None
    #: ``started_at - scheduled_for`` in ms (0 if early); None when ``started_at`` is.
    lateness_ms: float | None = None
    #: The function's return value (JSON), if it returned one that fits the size limit.
    result: Any = None
    #: Why a returned value was not kept (not JSON-serializable, too large).
    result_error: str | None = None
    #: How long the result is shown after this event (seconds; None: no result).
    keep_result_s: float | None = None


class TaskFailed(Event):
    task: str
    run_id: str
    attempt: int
    error: str
    traceback: str = ""
    duration_ms: float = 0.0
    #: ``error``, ``timeout``, ``cancelled`` (plugin unloaded, operator),
    #: ``interrupted`` (process died) or ``node_lost`` (the cluster node that claimed it
    #: stopped heartbeating).
    kind: Literal["error", "timeout", "cancelled", "interrupted", "node_lost"] = "error"
    #: Whether a retry follows (then a ``TaskRetryScheduled`` comes next).
    will_retry: bool = False
    #: The run's due time, given when another node records the failure (``node_lost``):
    #: the surviving schedulers retry the run from it.
    scheduled_for: float | None = None
    #: As in ``TaskSucceeded`` (None when the code never started).
    started_at: float | None = None
    lateness_ms: float | None = None


class TaskRetryScheduled(Event):
    task: str
    run_id: str
    #: The attempt that will run at ``retry_at``.
    attempt: int
    delay_s: float
    retry_at: float
    scheduled_for: float


class TaskSkipped(Event):
    """A due run did not start (``max_instances`` reached, dependency not satisfied...)."""

    task: str
    scheduled_for: float
    reason: str
    next_run: float | None = None
    #: The run that did not start (a dropped retry is no longer pending).
    run_id: str | None = None


class TaskReleased(Event):
    """The outcome of a run claimed ahead of its instant whose code cannot have run: the
    process stopped (SIGKILL, power loss) after its ``TaskStarted`` and before its
    instant, and the next boot came back before that instant; or the kernel stopped
    gracefully while the run waited for its instant (recorded at the stop). Not a
    failure: the claim is given up and the instant runs again under a new claim — a
    timed run's schedule goes back to it (``next_run``, then the misfire and coalescing
    rules as for any due time), a retry is pending again at ``retry_at``. One start, one
    outcome per claim."""

    task: str
    run_id: str
    scheduled_for: float
    attempt: int
    #: the released run's kind (``schedule`` or ``retry``)
    trigger: str
    reason: str
    #: the event id of the released ``TaskStarted`` (its claim key): the instant's next
    #: claim is keyed by a key derived from it (``claim.claim_key``), the same on every node
    claim: str
    next_run: float | None = None
    #: a released retry's time: it is pending again then
    retry_at: float | None = None


class TaskMissed(Event):
    """Runs fell due while the kernel was down (or the loop was stalled) and did not run."""

    task: str
    #: How many due times were missed (coalesced into at most one run with ``run_once``).
    count: int
    first: float
    last: float
    policy: Literal["run_once", "skip"]
    next_run: float | None = None


class TaskPauseRequested(Event):
    task: str


class TaskPaused(Event):
    task: str


class TaskResumeRequested(Event):
    task: str


class TaskResumed(Event):
    task: str
    next_run: float | None = None


class TaskRequestRefused(Event):
    """A request about a task was refused (e.g. the task is not scheduled)."""

    task: str
    reason: str


class TaskRunRequested(Event):
    """Someone asked to run the task now (admin API, CLI)."""

    task: str


class TaskRunAccepted(Event):
    """The answer to ``TaskRunRequested``: the run will happen, as ``run_id``.

    ``queue_position`` 0: it starts at once; n >= 1: it is n-th in line (behind the
    task's ``max_instances`` or the global limit). Its ``TaskStarted`` and outcome carry
    ``run_id``.
    """

    task: str
    run_id: str
    queue_position: int = 0


class TaskCancelRequested(Event):
    """Someone asked to cancel a run in progress (admin API, CLI)."""

    task: str
    run_id: str


class TaskCancelAnswered(Event):
    """``cancelled`` (its ``TaskFailed(kind="cancelled")`` follows), ``not_cancellable``
    (sync code in a worker thread cannot be stopped in-process) or ``not_running``."""

    task: str
    run_id: str
    status: Literal["cancelled", "not_cancellable", "not_running"]


class ScheduleAdded(Event):
    """An operator added a schedule at runtime (admin API / CLI): task ``task`` calls the
    function of the plugin's declared task ``function`` with this trigger and arguments.
    It is kept across restarts and scheduled whenever its plugin is loaded."""

    task: str
    plugin: str
    function: str
    #: The trigger in its dict form (``services.scheduler.triggers.parse_trigger``).
    trigger: dict[str, Any]
    args: list[Any] = []
    kwargs: dict[str, Any] = {}


class ScheduleChanged(Event):
    """An operator changed a schedule's trigger (and/or arguments) at runtime.

    For a task declared in plugin code, ``declared`` is the declaration the change was
    made against: when the plugin later declares something else, the declaration wins
    (``ScheduleConflict``)."""

    task: str
    trigger: dict[str, Any] | None = None
    args: list[Any] | None = None
    kwargs: dict[str, Any] | None = None
    declared: str | None = None


class ScheduleRemoved(Event):
    """An operator removed a schedule added at runtime."""

    task: str


class ScheduleApplied(Event):
    """The answer to ``ScheduleAdded`` / ``ScheduleChanged`` / ``ScheduleRemoved``."""

    task: str
    next_run: float | None = None
    scheduled: bool = True


class ScheduleConflict(Event):
    """A plugin's declared schedule changed while a runtime change overrode it: the
    declaration wins, the runtime change is dropped (and reported here)."""

    task: str
    plugin: str
    generation: int
    declared: str
    runtime: dict[str, Any]
    resolution: str = "the plugin's declared schedule wins; the runtime change is dropped"


#: Every event type the scheduler writes.
TASK_EVENTS: tuple[type[Event], ...] = (
    TaskScheduled,
    TaskUnscheduled,
    TaskRejected,
    TaskStarted,
    TaskSucceeded,
    TaskFailed,
    TaskRetryScheduled,
    TaskSkipped,
    TaskReleased,
    TaskMissed,
    TaskPauseRequested,
    TaskPaused,
    TaskResumeRequested,
    TaskResumed,
    TaskRunRequested,
    TaskRunAccepted,
    TaskCancelRequested,
    TaskCancelAnswered,
    TaskRequestRefused,
    ScheduleAdded,
    ScheduleChanged,
    ScheduleRemoved,
    ScheduleApplied,
    ScheduleConflict,
)
