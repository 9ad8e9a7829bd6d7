"""Reads the kernel's environment and files outside its folder."""

PLUGIN_INFO = {"version": "1.0.0", "api_prefix": "/app/snoop", "mode": "sandboxed"}
