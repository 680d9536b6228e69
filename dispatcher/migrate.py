"""Schema migrations: ``sql/migrations/NNNN_name.sql`` applied in order, each recorded
in ``schema_version``. ``sql/schema.sql`` is the same schema written fresh."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from dispatcher.queries import SQL_DIR

log = logging.getLogger(__name__)

_FILE = re.compile(r"^(\d{4})_(\w+)\.sql$")
# any fixed number works; it only keeps two `db upgrade` runs from racing
_LOCK_KEY = 0x45564E54

VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path


def migrations() -> list[Migration]:
    found = []
    for path in sorted((SQL_DIR / "migrations").iterdir()):
        m = _FILE.match(path.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), path))
    return found


async def current_version(conn: asyncpg.Connection) -> int:
    await conn.execute(VERSION_TABLE)
    return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version"))


async def upgrade(conn: asyncpg.Connection) -> list[Migration]:
    """Apply the migrations the database lacks, each in its own transaction."""
    applied: list[Migration] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        version = await current_version(conn)
        for mig in migrations():
            if mig.version <= version:
                continue
            async with conn.transaction():
                await conn.execute(mig.path.read_text())
                await conn.execute("INSERT INTO schema_version (version, name) VALUES ($1, $2)", mig.version, mig.name)
            log.info("applied migration", extra={"version": mig.version, "migration": mig.name})
            applied.append(mig)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied


async def create_fresh(conn: asyncpg.Connection) -> None:
    """Create the schema from ``schema.sql`` (what the migrations must add up to)."""
    async with conn.transaction():
        await conn.execute(VERSION_TABLE)
        await conn.execute((SQL_DIR / "schema.sql").read_text())
        # the fresh schema holds every migration's change: record them all as applied
        for mig in migrations():
            await conn.execute("INSERT INTO schema_version (version, name) VALUES ($1, $2)", mig.version, mig.name)
