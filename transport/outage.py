"""Waiting out an outage of Postgres or RabbitMQ instead of dying of it.

Only outages are waited out. A programming error (a ``RuntimeError`` of our own, a
``TypeError``, a constraint violation) must surface: retried forever as "service
unavailable" it would hide the bug and stop the work behind it without a word.
"""

from __future__ import annotations

import asyncio
import logging
import re
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
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,  # includes "connection does not exist" / "connection was closed"
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, cannot connect now
    asyncpg.exceptions.CannotConnectNowError,
    # a pooled connection whose server went away mid-operation (seen once Postgres is
    # restarted); the pool drops it on release, the retry gets another
    asyncpg.InternalClientError,
    aiormq.exceptions.AMQPError,
    aio_pika.exceptions.ChannelInvalidStateError,
    # two transactions that waited for each other (Postgres aborted one): run it again
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
)

# aio-pika and aiormq say "not connected (yet, or any more)" with a plain RuntimeError:
# only these messages are an outage
# ("Connection was not opened", '<Connection: "amqp://..."> closed', "No active transport
# in channel", "Closed channel", ...)
_CONNECTION_STATE = re.compile(
    r"connection\b.*\b(closed|not opened|not ready|reconnecting)|no active transport|"
    r"channel\b.*\bclosed|closed channel|channel not opened",
    re.IGNORECASE,
)


def is_outage(exc: BaseException) -> bool:
    """True for an error that a service coming back would cure."""
    if isinstance(exc, TRANSIENT):
        return True
    return type(exc) is RuntimeError and _CONNECTION_STATE.search(str(exc)) is not None


async def patiently(op: Callable[[], Awaitable[T]], *, what: str, max_delay: float = 10.0) -> T:
    """Run ``op`` until it succeeds, backing off while a service is unavailable."""
    delay = 0.25
    while True:
        try:
            return await op()
        except Exception as exc:
            if not is_outage(exc):
                raise
            log.warning("%s paused: service unavailable", what, extra={"error": repr(exc), "retry_in": delay})
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)
