"""Exits at import."""

import os

PLUGIN_INFO = {"version": "1.0.0", "api_prefix": "/app/quitter", "mode": "sandboxed"}

os._exit(1)
