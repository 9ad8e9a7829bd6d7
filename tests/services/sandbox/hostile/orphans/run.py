"""Leaves processes behind: a child in its process group, and a daemon (double fork into
a session of its own)."""

PLUGIN_INFO = {"version": "1.0.0", "api_prefix": "/app/orphans", "mode": "sandboxed"}
