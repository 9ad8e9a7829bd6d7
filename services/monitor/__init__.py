"""The monitor service: centralized logs, metrics, health, the live event stream, alerts."""
