"""RabbitMQ behind one small interface (aio-pika, robust connections).

Every publish is confirmed by the broker and mandatory: a message that is not routed
or not confirmed raises, it is never assumed delivered.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from dispatcher.config import Names, redact

log = logging.getLogger(__name__)

Handler = Callable[[AbstractIncomingMessage], Awaitable[None]]

# Per-job queues are quorum queues: they count deliveries (x-delivery-count), so a
# range that keeps killing workers can be recognised, and they survive a broker restart.
JOB_QUEUE_ARGS: dict[str, Any] = {"x-queue-type": "quorum"}


class JobQueue:
    """A worker's handle on one job's queue: ``get`` one event range at a time."""

    def __init__(self, channel: AbstractChannel, queue: AbstractQueue) -> None:
        self._channel = channel
        self._queue = queue

    async def get(self) -> AbstractIncomingMessage | None:
        """The next range, or None when the job has none left (or its queue is gone)."""
        if self._channel.is_closed:
            return None
        try:
            return await self._queue.get(no_ack=False, fail=False)
        except (aiormq.exceptions.AMQPError, aio_pika.exceptions.ChannelInvalidStateError, RuntimeError):
            # the job ended and its queue was deleted (RabbitMQ closes the channel for
            # every slot getting from it), or the connection dropped: nothing to take now
            return None

    async def close(self) -> None:
        if not self._channel.is_closed:
            try:
                await self._channel.close()
            except (aiormq.exceptions.AMQPError, RuntimeError):
                pass


class Broker:
    def __init__(self, connection: AbstractRobustConnection, names: Names) -> None:
        self.connection = connection
        self.names = names
        self._publisher: AbstractChannel | None = None
        self._reopen = asyncio.Lock()

    @classmethod
    async def connect(cls, url: str, names: Names, *, client: str = "dispatcher") -> Broker:
        log.info("connecting to RabbitMQ", extra={"url": redact(url)})
        connection = await aio_pika.connect_robust(url, client_properties={"connection_name": client})
        broker = cls(connection, names)
        await broker._channel()
        return broker

    async def close(self) -> None:
        await self.connection.close()

    async def declare_topology(self) -> None:
        ch = await self._channel()
        for name in (self.names.jobs, self.names.status, self.names.dlq):
            await ch.declare_queue(name, durable=True)

    async def _channel(self) -> AbstractChannel:
        """The publishing channel, opened again if RabbitMQ closed it (a channel error
        such as a cancelled RPC closes it; the connection stays)."""
        async with self._reopen:
            if self._publisher is None or self._publisher.is_closed:
                self._publisher = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
            return self._publisher

    # -- publishing -------------------------------------------------------------------

    async def publish(self, routing_key: str, body: bytes, *, headers: dict[str, Any] | None = None) -> None:
        """Publish persistently to a queue; returns once RabbitMQ confirmed it."""
        ch = await self._channel()
        message = aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers=headers or {},
        )
        await ch.default_exchange.publish(message, routing_key=routing_key, mandatory=True)

    async def publish_many(self, items: Iterable[tuple[str, bytes]]) -> None:
        """Publish concurrently (confirms are pipelined), waiting for every confirm."""
        await asyncio.gather(*(self.publish(key, body) for key, body in items))

    async def dead_letter(self, body: bytes, reason: str, *, source: str) -> None:
        log.warning("dead-lettering a message", extra={"reason": reason, "source": source})
        await self.publish(self.names.dlq, body, headers={"x-reason": reason[:1000], "x-source-queue": source})

    # -- queues -----------------------------------------------------------------------

    async def declare_job_queue(self, name: str) -> None:
        ch = await self._channel()
        await ch.declare_queue(name, durable=True, arguments=JOB_QUEUE_ARGS)

    async def delete_queue(self, name: str) -> None:
        ch = await self._channel()
        await ch.queue_delete(name)

    async def queue_depth(self, name: str) -> int | None:
        """Messages ready in a queue, or None if it does not exist."""
        ch = await self.connection.channel()
        try:
            queue = await ch.declare_queue(name, passive=True)
            return queue.declaration_result.message_count
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        finally:
            if not ch.is_closed:
                await ch.close()

    async def open_job(self, name: str) -> JobQueue:
        ch = await self.connection.channel()
        queue = await ch.get_queue(name, ensure=False)
        return JobQueue(ch, queue)

    async def consume(self, queue_name: str, handler: Handler, *, prefetch: int) -> Callable[[], Awaitable[None]]:
        """Consume with bounded prefetch; returns a coroutine function that stops it."""
        ch = await self.connection.channel()
        await ch.set_qos(prefetch_count=prefetch)
        queue = await ch.get_queue(queue_name, ensure=False)
        tag = await queue.consume(handler, no_ack=False)

        async def stop() -> None:
            if not ch.is_closed:
                await queue.cancel(tag)
                await ch.close()

        return stop

    async def announcements(self) -> Announcements:
        ch = await self.connection.channel()
        await ch.set_qos(prefetch_count=1)
        return Announcements(await ch.get_queue(self.names.jobs, ensure=False))


class Announcements:
    """Waits for one job announcement at a time. The consumer runs only while a worker
    is looking for a job, so an announcement never sits in a busy worker's buffer."""

    def __init__(self, queue: AbstractQueue) -> None:
        self._queue = queue

    async def next(self) -> AbstractIncomingMessage:
        got: asyncio.Future[AbstractIncomingMessage] = asyncio.get_running_loop().create_future()

        async def on_message(message: AbstractIncomingMessage) -> None:
            if got.done():
                await message.nack(requeue=True)  # raced with the cancel: give it back
            else:
                got.set_result(message)

        tag = await self._queue.consume(on_message, no_ack=False)
        try:
            return await got
        finally:
            try:
                await self._queue.cancel(tag)
            except (aiormq.exceptions.AMQPError, RuntimeError):
                pass
