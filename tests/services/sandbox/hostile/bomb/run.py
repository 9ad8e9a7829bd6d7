"""A fork bomb."""

PLUGIN_INFO = {
    "version": "1.0.0",
    "api_prefix": "/app/bomb",
    "mode": "sandboxed",
    "limits": {"processes": 24},
}
