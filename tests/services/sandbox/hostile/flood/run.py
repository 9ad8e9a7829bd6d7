"""Floods stdout."""

PLUGIN_INFO = {
    "version": "1.0.0",
    "api_prefix": "/app/flood",
    "mode": "sandboxed",
    "limits": {"wall_time": "2s"},
}
