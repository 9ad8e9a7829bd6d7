"""The scheduler service: cron, interval and one-shot tasks declared by plugins.

Every schedule and every run is an event (``services/scheduler/events.py``); the task
table operators see is a projection (``projection.py``); the timer state is rebuilt
from that projection at boot, so a restart resumes exactly where the log says.
"""
