"""The router mounter: per-plugin ASGI apps behind one dispatcher, OpenAPI merge, stats.

See ``docs/routing.md``. Public to other services: ``events.py`` (the contract) and
``projection.py`` (the router state); the rest is this service's own.
"""
