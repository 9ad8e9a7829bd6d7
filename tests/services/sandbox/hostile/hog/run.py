"""Eats memory until it dies."""

PLUGIN_INFO = {
    "version": "1.0.0",
    "api_prefix": "/app/hog",
    "mode": "sandboxed",
    "limits": {"memory": "600m"},
}
