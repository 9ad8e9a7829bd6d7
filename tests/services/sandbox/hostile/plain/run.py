"""A trusted plugin that must keep answering during every attack."""

PLUGIN_INFO = {"version": "1.0.0", "api_prefix": "/app/plain"}
