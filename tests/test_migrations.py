"""The migrations add up to schema.sql, and upgrading is idempotent."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from dispatcher import migrate
from dispatcher.queries import parse, queries
from dispatcher.store import Store
from dispatcher.submit import submit
from tests.conftest import Services, _drop, create_database
from tests.test_failures import assert_counts_kept, write_workflow

COUNTERS = 11  # the migration that added the event counters

# Everything that makes up the schema, in a comparable form.
CATALOG = {
    "columns": """
        SELECT table_name, column_name, data_type, is_nullable, column_default, ordinal_position
        FROM information_schema.columns WHERE table_schema = 'public' ORDER BY 1, 2""",
    "constraints": """
        SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
        FROM pg_constraint WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2""",
    "indexes": "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1, 2",
    "functions": """
        SELECT proname, pg_get_functiondef(oid) FROM pg_proc
        WHERE pronamespace = 'public'::regnamespace ORDER BY 1""",
    "triggers": """
        SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid) FROM pg_trigger
        WHERE NOT tgisinternal ORDER BY 1, 2""",
    "storage": """
        SELECT relname, reloptions FROM pg_class
        WHERE relnamespace = 'public'::regnamespace AND relkind = 'r' ORDER BY 1""",
    "versions": "SELECT version, name FROM schema_version ORDER BY 1",
}


async def catalog(dsn: str) -> dict[str, list[tuple[object, ...]]]:
    conn = await asyncpg.connect(dsn)
    try:
        return {k: [tuple(r) for r in await conn.fetch(sql)] for k, sql in CATALOG.items()}
    finally:
        await conn.close()


async def test_migrated_database_equals_fresh_schema(services: Services) -> None:
    migrated, fresh = await create_database(services), await create_database(services)
    try:
        conn = await asyncpg.connect(services.dsn(migrated))
        applied = await migrate.upgrade(conn)
        assert [m.version for m in applied] == [m.version for m in migrate.migrations()]
        assert await migrate.upgrade(conn) == []  # a second upgrade does nothing
        await conn.close()
        conn = await asyncpg.connect(services.dsn(fresh))
        await migrate.create_fresh(conn)
        await conn.close()
        a, b = await catalog(services.dsn(migrated)), await catalog(services.dsn(fresh))
        assert a["columns"], "the comparison must see the tables"
        assert a == b
    finally:
        await _drop(services, migrated)
        await _drop(services, fresh)


def test_migration_files_are_numbered_without_gaps() -> None:
    versions = [m.version for m in migrate.migrations()]
    assert versions == list(range(1, len(versions) + 1))


def test_every_named_query_is_unique_and_nonempty() -> None:
    assert all(sql for sql in queries().values())
    with pytest.raises(ValueError, match="defined twice"):
        parse("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;\n")


async def test_the_counters_migration_counts_the_events_and_attempts_already_there(
    services: Services, tmp_path: Path
) -> None:
    name = await create_database(services)
    try:
        conn = await asyncpg.connect(services.dsn(name))
        await conn.execute(migrate.VERSION_TABLE)
        for mig in migrate.migrations():  # a database from before the counters, in use
            if mig.version < COUNTERS:
                await conn.execute(mig.path.read_text())
                await conn.execute("INSERT INTO schema_version (version, name) VALUES ($1, $2)", mig.version, mig.name)
        store = await Store.connect(services.dsn(name))
        await submit(store, write_workflow(tmp_path, {"a": [f"ok:{i}" for i in range(20)]}, per_job=5))
        await store.pool.execute(
            "INSERT INTO attempts (job_id, number, attempt, status, worker, started_at, ended_at)"
            " SELECT job_id, number, 1, 'finished', 'w', now() - interval '2 s', now() FROM events WHERE number < 8"
        )
        await store.pool.execute("UPDATE events SET status = 'finished', attempt = 1 WHERE number < 8")
        assert await conn.fetchval("SELECT to_regclass('event_counts')") is None
        assert [m.version for m in await migrate.upgrade(conn)] == [COUNTERS]
        await assert_counts_kept(store)
        durations = await store.duration_counts([await store.pool.fetchval("SELECT id FROM tasks")])
        assert [(d["status"], d["n"]) for d in durations] == [("finished", 8)]
        await store.close()
        await conn.close()
    finally:
        await _drop(services, name)
