"""The transport interface: what the control plane and the workers need from a message
broker, and nothing more. Two adapters implement it: ``transport.rabbitmq`` (the real
one) and ``transport.memory`` (in process, for fast unit tests).

The semantics both keep, and the code above relies on:
- a publish returns once the broker has the message; one that no queue takes raises;
- a consumer gets at most ``prefetch`` unacked messages at once;
- a message delivered and not acked goes back to its queue when its consumer's
  connection closes, and comes again flagged ``redelivered``;
- a delayed publish reaches its queue after about its delay (one of the policy's steps);
- a job queue's range that is rejected goes to the dead-ranges queue, with ``x-death``.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from schemas.messages import M, MessageError, decode
from transport.names import Names

log = logging.getLogger(__name__)

DELAY_HEADER = "es-delay-ms"
# on a message a worker refused, forwarded to es.dlq by the bookkeeper: never replayed
REFUSED_BY_HEADER = "x-refused-by"


class Incoming(Protocol):
    """A message delivered by a consumer (``consume``, ``listen_control``, ``get``)."""

    @property
    def body(self) -> bytes: ...

    @property
    def headers(self) -> Mapping[str, Any]: ...

    @property
    def redelivered(self) -> bool | None: ...

    async def ack(self) -> None: ...

    async def nack(self, *, requeue: bool = True) -> None: ...


Handler = Callable[[Incoming], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Delivery:
    """A range as the broker delivered it from a job's queue (acked through its JobQueue)."""

    body: bytes
    delivery_tag: int
    redelivered: bool
    headers: Mapping[str, Any]


class JobQueue(abc.ABC):
    """A worker's consumer on one job's queue.

    The broker pushes ranges, at most ``prefetch`` unacked at once (running, waiting for
    a slot, or waiting for their statuses to be confirmed), so a worker never hides more
    than that from other workers. ``get`` says None once the queue has nothing ready for
    us; ``close`` gives back what was delivered and not acked.
    """

    name: str
    backlog: int | None  # ranges ready when we started consuming (None: the queue is gone)

    @property
    @abc.abstractmethod
    def idle(self) -> bool:
        """No range delivered and waiting for a slot."""

    @property
    @abc.abstractmethod
    def full(self) -> bool:
        """As many ranges held unacked as the prefetch allows: the broker sends no more
        until one is acked."""

    @abc.abstractmethod
    async def consume(self) -> None:
        """Start consuming (after a job's set-up)."""

    @abc.abstractmethod
    async def resume(self) -> None:
        """Consume again: new work arrived in a job we still hold."""

    @abc.abstractmethod
    async def get(self) -> Delivery | None:
        """The next range, or None when the job has none left for us (or its queue is gone)."""

    @abc.abstractmethod
    async def ack(self, message: Delivery) -> None:
        """Done with a range this queue delivered."""

    @abc.abstractmethod
    async def stop_consuming(self) -> None:
        """Take no new range; those delivered stay ours until acked or closed."""

    @abc.abstractmethod
    async def close(self, *, give_back: bool = True) -> None:
        """Stop consuming; ranges delivered but never acked go back to the queue (they
        come again flagged ``redelivered``), or, ``give_back=False``, are acked and
        dropped: their job was cancelled."""


class Announcements(abc.ABC):
    """Job announcements, one at a time: a worker consumes es.jobs only while it looks
    for a job, so an announcement never sits in a busy worker's buffer."""

    @abc.abstractmethod
    async def next(self) -> Incoming: ...


class Transport(abc.ABC):
    """One client's connection to the broker, under one set of ``names``."""

    names: Names

    @abc.abstractmethod
    async def close(self) -> None: ...

    # -- topology ---------------------------------------------------------------------

    @abc.abstractmethod
    async def declare_topology(self) -> None:
        """Declare every fixed queue and exchange (idempotent; the control plane's job)."""

    @abc.abstractmethod
    async def delete_topology(self) -> None: ...

    @abc.abstractmethod
    async def check_topology(self) -> None:
        """Raise unless what a worker uses is declared (a worker declares none of it)."""

    # -- publishing -------------------------------------------------------------------

    @abc.abstractmethod
    async def publish(self, routing_key: str, body: bytes, *, headers: Mapping[str, Any] | None = None) -> None:
        """Persistently to the queue ``routing_key``; returns once the broker has it."""

    @abc.abstractmethod
    async def publish_many(self, items: Iterable[tuple[str, bytes]]) -> None:
        """(queue, body) pairs, returning once the broker has all of them."""

    @abc.abstractmethod
    async def publish_status(self, body: bytes) -> None:
        """A worker's status batch, through the status exchange."""

    @abc.abstractmethod
    async def publish_delayed(self, routing_key: str, body: bytes, seconds: float) -> None:
        """So that the message reaches ``routing_key`` after about ``seconds``: it waits
        in a delay queue, never in a consumer."""

    @abc.abstractmethod
    async def broadcast(self, body: bytes) -> None:
        """To every worker listening for control messages (none listening is fine)."""

    # -- consuming --------------------------------------------------------------------

    @abc.abstractmethod
    async def consume(self, queue_name: str, handler: Handler, *, prefetch: int) -> Callable[[], Awaitable[None]]:
        """Consume with bounded prefetch; returns a coroutine function that stops it
        (its unacked messages go back)."""

    @abc.abstractmethod
    async def listen_control(self, handler: Handler) -> None:
        """A private queue on the control exchange, gone with the connection."""

    @abc.abstractmethod
    async def announcements(self) -> Announcements: ...

    @abc.abstractmethod
    def on_reconnect(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` each time the connection is back after it was lost (its
        consumers restored)."""

    @abc.abstractmethod
    async def get(self, queue_name: str) -> Incoming | None:
        """One message from a queue, unacked (None if it has none ready)."""

    @abc.abstractmethod
    async def ack_all(self, messages: Iterable[Incoming]) -> None:
        """Ack messages this connection consumed; one lost with its channel is skipped
        (the broker delivers it again)."""

    @abc.abstractmethod
    async def open_job(self, name: str, *, prefetch: int = 1, idle: float = 0.01, consume: bool = True) -> JobQueue:
        """A consumer on a job's queue; ``consume=False``: only looked at (``backlog``)
        until its ``consume()``."""

    # -- queues -----------------------------------------------------------------------

    @abc.abstractmethod
    async def declare_job_queue(self, name: str) -> None: ...

    @abc.abstractmethod
    async def delete_queue(self, name: str, *, wait: bool = True) -> None:
        """``wait=False``: returns once the delete is sent, not done (a queue whose
        members are down takes seconds to delete)."""

    @abc.abstractmethod
    async def purge_queue(self, name: str) -> None:
        """Drop the messages ready in a job's queue (not those delivered and unacked); a
        missing queue is declared (empty)."""

    @abc.abstractmethod
    async def queue_state(self, name: str) -> tuple[int, int] | None:
        """(messages ready, consumers) of a queue, or None if it does not exist."""

    async def queue_depth(self, name: str) -> int | None:
        """Messages ready in a queue, or None if it does not exist."""
        state = await self.queue_state(name)
        return None if state is None else state[0]

    async def give_back(self, queue_name: str, messages: Sequence[Incoming], *, wait: float = 2.0) -> None:
        """Requeue messages taken from a queue with ``get``, and wait (``wait`` seconds at
        most) until the queue shows them again: a quorum queue takes them back a moment
        after the nack, and a command run right after must find them there."""
        for message in messages:
            await message.nack(requeue=True)
        deadline = time.monotonic() + wait
        while messages and time.monotonic() < deadline:  # (only the broker can say: polled)
            if (await self.queue_depth(queue_name) or 0) >= len(messages):
                return
            await asyncio.sleep(0.02)

    # -- dead letters (the same on every broker) -------------------------------------

    async def dead_letter(self, body: bytes, reason: str, *, source: str) -> None:
        log.warning("dead-lettering a message", extra={"reason": reason, "source": source})
        await self.publish(self.names.dlq, body, headers={"x-reason": reason[:1000], "x-source-queue": source})

    async def decode_or_dead_letter(self, message: Incoming, model: type[M], *, source: str) -> M | None:
        """The message as ``model``; a poison message goes to es.dlq with the reason and
        is acked, and None is returned: it is never executed, never retried."""
        try:
            return decode(message.body, model)
        except MessageError as exc:
            await self.dead_letter(message.body, str(exc), source=source)
            await message.ack()
            return None
