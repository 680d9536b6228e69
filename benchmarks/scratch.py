"""A database of its own for a benchmark: created from an admin DSN, migrated, and dropped
afterwards (unless kept)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import asyncpg

from dispatcher import migrate


@contextlib.asynccontextmanager
async def scratch_database(admin_dsn: str, *, keep: bool = False) -> AsyncIterator[str]:
    """Yields the new database's DSN."""
    name = f"es_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = admin_dsn.rsplit("/", 1)[0] + f"/{name}"
    try:
        conn = await asyncpg.connect(dsn)
        await migrate.upgrade(conn)
        await conn.close()
        yield dsn
    finally:
        if not keep:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
