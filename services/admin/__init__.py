"""The admin service: the bearer-token guard of every ``/admin`` route, and the log API."""
