"""Opens a socket to the kernel's port on 127.0.0.1."""

PLUGIN_INFO = {"version": "1.0.0", "api_prefix": "/app/net", "mode": "sandboxed"}
