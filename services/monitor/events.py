"""Events of the monitor service: its public contract (other services may import this).

Stream: ``monitor`` for every alert and notification event.

- ``AlertRaised``: a rule's condition started holding for ``key`` (a task, a plugin, a
  subscriber); recorded once per episode, however many failures follow.
- ``AlertResolved``: the episode of ``key`` ended (a success, a load, the lag cleared).
- ``NotificationFailed``: a sink could not deliver a notification after its retries.
"""

from __future__ import annotations

from kernel.events import Event

__all__ = ["STREAM", "AlertRaised", "AlertResolved", "NotificationFailed"]

STREAM = "monitor"


class AlertRaised(Event):
    #: What the alert is about, e.g. ``task-failures:jobs.collect``.
    key: str
    rule: str
    kind: str
    #: The task, plugin or subscriber named by the key.
    subject: str
    #: Failures counted within the window (or the lag measured).
    count: float
    window: float
    message: str


class AlertResolved(Event):
    key: str
    rule: str
    subject: str
    reason: str


class NotificationFailed(Event):
    #: ``webhook`` and the URL's scheme, host and path (never its query or credentials).
    sink: str
    #: The id of the event that was to be delivered.
    event_id: str
    event_type: str
    error: str
    attempts: int
