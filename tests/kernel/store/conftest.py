"""The PostgreSQL fixtures of the store tests (see tests/pg.py)."""

from __future__ import annotations

from tests.pg import pg_dsn

__all__ = ["pg_dsn"]
