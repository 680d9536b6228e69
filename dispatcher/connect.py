"""Start-up connections of the long-running commands (``dispatcher start``, ``worker``,
``monitor``): a service that is down is waited for, with capped backoff, until it is up
or the process is told to stop. One-shot commands (submit, status, ...) do not use this:
a user at a terminal wants an answer, not a wait.

Only outages are waited out (``retry.is_outage``). A refused login, a missing vhost or
a permission RabbitMQ denies will not cure itself: those end the command at once
(``ServiceRefused``) instead of retrying forever in silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import unquote, urlsplit

from dispatcher.config import Names, redact
from dispatcher.store import Store

if TYPE_CHECKING:
    from transport.interface import Transport
    from transport.rabbitmq import Broker

# aio-pika, aiormq (and transport.outage, which imports them) are imported where used:
# the CLI imports this module for every command, and `dispatcher status` needs none of them

log = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_DELAY = 0.25
MAX_DELAY = 10.0


class ServiceRefused(Exception):
    """A service answered but will not serve us: a configuration error, not an outage."""


def _refusal(exc: BaseException) -> str | None:
    """Why RabbitMQ turned us away for good, or None if ``exc`` is no refusal."""
    import aiormq.exceptions

    if isinstance(exc, aiormq.exceptions.AuthenticationError | aiormq.exceptions.ProbableAuthenticationError):
        return "login refused (user or password)"
    if isinstance(exc, aiormq.exceptions.ConnectionNotAllowed):
        return "vhost refused (does it exist, and may this user use it?)"
    # RabbitMQ closing the connection while it is being opened: an unknown vhost or one
    # the user has no permission on (aiormq reports the Connection.Close as a bad frame)
    if isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in str(exc):
        return "vhost refused (does it exist, and may this user use it?)"
    if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
        return f"permission refused: {exc}"
    return None


def _scrub(text: str, url: str) -> str:
    """``text`` without the URL's password, in case an error quotes it."""
    password = urlsplit(url).password
    for secret in {password, unquote(password or "")} - {None, ""}:
        assert secret is not None
        text = text.replace(secret, "***")
    return text


class _DropTransportErrors(logging.Filter):
    """aiormq logs every failed TCP connect at ERROR; while we wait, our own WARNING says it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("error when creating transport")


@contextlib.contextmanager
def _quiet_aiormq() -> Iterator[None]:
    logger = logging.getLogger("aiormq.connection")
    quiet = _DropTransportErrors()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


async def _stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
    return stop.is_set()


async def wait_for(
    attempt: Callable[[], Awaitable[T]],
    *,
    waiting: str,
    done: str,
    url: str,
    stop: asyncio.Event,
    max_delay: float = MAX_DELAY,
) -> T | None:
    """``attempt()``'s result once it succeeds, retried with backoff while it fails of an
    outage (``waiting`` logged at WARNING each time, ``done`` once it succeeds after a
    wait); None if ``stop`` is set first (the attempt in progress is cancelled)."""
    from transport.outage import is_outage

    delay = FIRST_DELAY
    waited = False
    while not stop.is_set():
        task = asyncio.ensure_future(attempt())
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([task, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not task.done():  # told to stop mid-attempt
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            return None
        exc = task.exception()
        if exc is None:
            if waited:
                log.info(done, extra={"url": redact(url)})
            return task.result()
        reason = _refusal(exc)
        if reason is not None:
            raise ServiceRefused(f"{redact(url)}: {_scrub(reason, url)}") from exc
        if not is_outage(exc):
            raise exc
        waited = True
        log.warning(
            waiting,
            extra={"url": redact(url), "error": _scrub(repr(exc), url), "retry_in": delay},
        )
        if await _stopped_within(stop, delay):
            return None
        delay = min(delay * 2, max_delay)
    return None


async def connect_broker(
    url: str, names: Names, *, client: str, stop: asyncio.Event, queue_type: str = "quorum"
) -> Broker | None:
    """A Broker once RabbitMQ answers; None if told to stop first."""
    from transport.rabbitmq import Broker

    with _quiet_aiormq():
        return await wait_for(
            lambda: Broker.connect(url, names, client=client, queue_type=queue_type),
            waiting="RabbitMQ unavailable: waiting",
            done="connected to RabbitMQ",
            url=url,
            stop=stop,
        )


async def connect_store(url: str, *, max_size: int, stop: asyncio.Event) -> Store | None:
    """A Store once Postgres answers; None if told to stop first."""
    return await wait_for(
        lambda: Store.connect(url, max_size=max_size),
        waiting="Postgres unavailable: waiting",
        done="connected to Postgres",
        url=url,
        stop=stop,
    )


async def _look_at_topology(broker: Transport) -> bool:
    await broker.check_topology()
    return True


async def await_topology(broker: Transport, url: str, *, stop: asyncio.Event) -> bool:
    """Wait until the control plane has declared what a worker uses (a worker declares
    none of it: its RabbitMQ user may not). False if told to stop first."""
    looked = await wait_for(
        lambda: _look_at_topology(broker),
        waiting="queues not declared yet: waiting for the control plane (dispatcher start)",
        done="queues declared",
        url=url,
        stop=stop,
    )
    return looked is True
