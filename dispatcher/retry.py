"""Waiting out an outage of Postgres or RabbitMQ instead of dying of it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aio_pika.exceptions
import aiormq.exceptions
import asyncpg

log = logging.getLogger(__name__)

T = TypeVar("T")

# errors after which the same operation may succeed once the service is back
TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,  # includes "connection does not exist" / "connection was closed"
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, cannot connect now
    # a pooled connection whose server went away mid-operation (seen once Postgres is
    # restarted); the pool drops it on release, the retry gets another
    asyncpg.InternalClientError,
    aiormq.exceptions.AMQPError,
    aio_pika.exceptions.ChannelInvalidStateError,
    RuntimeError,  # aio-pika: "Connection was not opened" / "... closed" while reconnecting
    # two transactions that waited for each other (Postgres aborted one): run it again
    asyncpg.exceptions.DeadlockDetectedError,
)


async def patiently(op: Callable[[], Awaitable[T]], *, what: str, max_delay: float = 10.0) -> T:
    """Run ``op`` until it succeeds, backing off while a service is unavailable."""
    delay = 0.25
    while True:
        try:
            return await op()
        except TRANSIENT as exc:
            log.warning("%s paused: service unavailable", what, extra={"error": repr(exc), "retry_in": delay})
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)
