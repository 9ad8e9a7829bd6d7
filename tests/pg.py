"""A private PostgreSQL for the tests: one fresh schema per test on the server whose DSN
is in ``TEST_PG_DSN`` (``.ci/postgres start`` prints it; CI always sets it).

(Not ``XCORE_*``: every ``XCORE_`` variable is read as a setting, and an unknown one is
refused.) Without the variable the PostgreSQL tests are skipped locally — and fail in CI
(``CI=true``), so a CI run can never pass by skipping them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest

__all__ = ["PG_DSN", "pg_dsn", "pg_schema", "require_pg", "with_schema"]

PG_DSN = os.environ.get("TEST_PG_DSN", "")


def require_pg() -> str:
    if not PG_DSN:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI must run the PostgreSQL tests: TEST_PG_DSN is not set")
        pytest.skip("no PostgreSQL server (set TEST_PG_DSN; see .ci/postgres)")
    return PG_DSN


def with_schema(dsn: str, schema: str) -> str:
    sep = "&" if "?" in dsn else "?"
    return f"{dsn}{sep}search_path={schema}"


@pytest.fixture
async def pg_dsn() -> AsyncIterator[str]:
    """The DSN of an empty schema of its own, dropped after the test."""
    async with pg_schema() as dsn:
        yield dsn


@asynccontextmanager
async def pg_schema() -> AsyncIterator[str]:
    """A fresh schema on the test server (its DSN), dropped on exit."""
    base = require_pg()
    schema = "t_" + uuid.uuid4().hex[:12]
    conn = await asyncpg.connect(base)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
    finally:
        await conn.close()
    try:
        yield with_schema(base, schema)
    finally:
        if os.environ.get("TEST_PG_KEEP"):  # to look at it after a failure
            print(f"kept schema {schema}")
        else:
            conn = await asyncpg.connect(base)
            try:
                await conn.execute(f"DROP SCHEMA {schema} CASCADE")
            finally:
                await conn.close()
