"""An endless loop in a route (on the worker's event loop)."""

PLUGIN_INFO = {
    "version": "1.0.0",
    "api_prefix": "/app/spin",
    "mode": "sandboxed",
    "limits": {"wall_time": "2s"},
}
