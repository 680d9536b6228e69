"""Fixtures: the real RabbitMQ and Postgres, one isolated namespace per test.

Services: ``DISPATCHER_TEST_AMQP_URL`` / ``DISPATCHER_TEST_DATABASE_URL`` when set, else
the loopback services; if those do not answer and Docker runs, testcontainers starts both.
Each test gets its own database (cloned from a migrated template, as procrastinate does)
and its own queue-name prefix, and leaves neither behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import aiormq
import asyncpg
import pytest

from dispatcher import migrate
from dispatcher.config import DEFAULT_AMQP_URL, DEFAULT_DATABASE_URL, Names, Settings
from dispatcher.store import Store
from transport.outage import patiently
from transport.rabbitmq import Broker

if TYPE_CHECKING:
    from tests.test_crashes import Processes

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@dataclass(frozen=True)
class Services:
    amqp_url: str
    admin_dsn: str  # a database we may CREATE DATABASE from

    def dsn(self, database: str) -> str:
        return urlunsplit(urlsplit(self.admin_dsn)._replace(path=f"/{database}"))


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    amqp = os.environ.get("DISPATCHER_TEST_AMQP_URL", DEFAULT_AMQP_URL)
    pg = os.environ.get("DISPATCHER_TEST_DATABASE_URL", DEFAULT_DATABASE_URL)
    if _reachable(amqp, 5672) and _reachable(pg, 5432):
        yield Services(amqp, pg)
        return
    # Fallback for machines with Docker but without local services.
    try:
        from testcontainers.postgres import PostgresContainer
        from testcontainers.rabbitmq import RabbitMqContainer
    except ImportError:  # pragma: no cover
        pytest.fail(f"RabbitMQ ({amqp}) or Postgres ({pg}) unreachable, and testcontainers is not installed")
    try:
        with PostgresContainer("postgres:16", driver=None) as pgc, RabbitMqContainer("rabbitmq:3.13") as mq:
            amqp = f"amqp://guest:guest@{mq.get_container_host_ip()}:{mq.get_exposed_port(5672)}/"
            yield Services(amqp, pgc.get_connection_url())
    except Exception as exc:  # pragma: no cover - depends on the machine
        pytest.fail(f"RabbitMQ ({amqp}) or Postgres ({pg}) unreachable, and Docker could not start them: {exc}")


@pytest.fixture(scope="session")
def template_db(services: Services) -> Iterator[str]:
    """A migrated database that each test's database is cloned from."""
    name = f"es_tmpl_{os.getpid()}"

    async def create() -> None:
        admin = await asyncpg.connect(services.admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        conn = await asyncpg.connect(services.dsn(name))
        try:
            await migrate.upgrade(conn)
        finally:
            await conn.close()

    asyncio.run(create())
    yield name
    asyncio.run(_drop(services, name))


async def _drop(services: Services, name: str) -> None:
    admin = await asyncpg.connect(services.admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def create_database(services: Services, template: str | None = None) -> str:
    name = f"es_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(services.admin_dsn)
    try:
        suffix = f' TEMPLATE "{template}"' if template else ""
        await admin.execute(f'CREATE DATABASE "{name}"{suffix}')
    finally:
        await admin.close()
    return name


@pytest.fixture
async def database(services: Services, template_db: str) -> AsyncIterator[str]:
    """The DSN of a fresh, migrated database of this test's own."""
    name = await create_database(services, template_db)
    yield services.dsn(name)
    await _drop(services, name)


@pytest.fixture
def names() -> Names:
    return Names(prefix=f"t{uuid.uuid4().hex[:8]}.")


@pytest.fixture
def settings(services: Services, database: str, names: Names, tmp_path: Path) -> Settings:
    return Settings(
        amqp_url=services.amqp_url,
        database_url=database,
        names=names,
        work_dir=tmp_path / "work",
        log_dir=tmp_path / "logs",
        batch_linger=0.01,
        heartbeat_interval=0.5,  # lost workers are found within 1.5 s
    )


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    s = await Store.connect(settings.database_url)
    yield s
    await s.close()


@pytest.fixture
async def broker(settings: Settings, store: Store) -> AsyncIterator[Broker]:
    """A broker under the test's prefix; afterwards every queue of the test is deleted."""
    # bounded: a broker that accepts TCP and never answers (out of file handles, say)
    # must fail the test, not hang the suite
    b = await asyncio.wait_for(Broker.connect(settings.amqp_url, settings.names, client="pytest"), 60)
    await asyncio.wait_for(b.declare_topology(), 60)
    yield b
    job_ids = [r["id"] for r in await store.pool.fetch("SELECT id FROM jobs")]
    for name in map(settings.names.job, job_ids):
        with contextlib.suppress(aiormq.exceptions.AMQPError):
            await b.delete_queue(name)
    # after a RabbitMQ restart our robust connection may still be on its way back
    await patiently(b.delete_topology, what="test clean-up", max_delay=1.0)
    await b.close()


def example(name: str) -> Path:
    return EXAMPLES / name


@pytest.fixture
def procs(settings: Settings, tmp_path: Path, broker: Broker) -> Iterator[Processes]:
    """CLI processes (dispatcher start, worker) of the test's namespace, stopped after it;
    then (``broker``'s tear-down) every queue they declared is deleted: quorum queues left
    behind hold RabbitMQ's file handles, and at about 300 it accepts no more connections."""
    from tests.test_crashes import Processes

    p = Processes(settings, tmp_path)
    yield p
    p.stop()
