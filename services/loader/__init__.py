"""The plugin loader service: discovery, hot reload and installation of plugins (``service.py``)."""
