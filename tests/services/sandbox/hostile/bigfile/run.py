"""Writes a huge file."""

PLUGIN_INFO = {
    "version": "1.0.0",
    "api_prefix": "/app/bigfile",
    "mode": "sandboxed",
    "limits": {"file_size": "8m"},
}
