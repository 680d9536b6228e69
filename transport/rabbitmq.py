"""RabbitMQ behind one small interface (aio-pika, robust connections).

Every publish is confirmed by the broker and mandatory: a message that is not routed
or not confirmed raises, it is never assumed delivered.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aiormq import spec
from aiormq.abc import DeliveredMessage
from yarl import URL

from transport import fastpath
from transport.interface import DELAY_HEADER, REFUSED_BY_HEADER, Delivery, Handler, Incoming, JobQueue, Transport
from transport.interface import Announcements as AnnouncementsBase
from transport.names import Names
from transport.outage import is_outage
from transport.policy import DELAY_STEPS_MS, delay_step
from transport.urls import redact, split_urls

log = logging.getLogger(__name__)
_consumer_ids = itertools.count()  # consumer tags of job queues, unique in this process

__all__ = ["DELAY_HEADER", "REFUSED_BY_HEADER", "AmqpJobQueue", "Broker", "with_heartbeat"]

# Per-job queues are durable queues (quorum unless classic ones were asked for), consumed
# with a prefetch. A range delivered again (its holder was lost, or RabbitMQ restarted)
# arrives flagged ``redelivered``; the worker that gets it does not run it but returns its
# events to the control plane, which charges an attempt only for events Postgres saw
# running and issues them again (see ``return_events`` in the SQL). A range that keeps
# killing workers runs out of attempts.

# AMQP heartbeats (seconds) unless the URL sets its own: a hung peer (a SIGSTOPped
# worker) is dropped by RabbitMQ after about two of them, and its unacked ranges go back
# to their queues. Workers run blocking payload functions in their event loop, so a
# function that blocks longer than this loses its worker's connection.
HEARTBEAT = 10
# seconds between a lost connection's attempts to connect again (aio-pika's default is 5)
RECONNECT_SECONDS = 1.0
# what a queue operation may take: a quorum queue's declare can hang while its cluster
# forms after a node died; it is then an outage, retried, never a wait for ever
RPC_SECONDS = 15.0
QUEUE_TYPES = ("quorum", "classic")


def with_heartbeat(url: str, seconds: int = HEARTBEAT) -> str:
    """``url`` with ``heartbeat=seconds`` in its query unless it names one already."""
    if "heartbeat=" in url:
        return url
    return f"{url}{'&' if '?' in url else '?'}heartbeat={seconds}"


class AmqpJobQueue(JobQueue):
    """A worker's consumer on one job's queue (see ``JobQueue``).

    RabbitMQ pushes ranges, so no range costs a basic.get round trip. ``get`` says None
    once the queue has nothing ready: after ``idle`` seconds without a delivery it asks
    the queue, and stops consuming if it is empty.
    """

    def __init__(self, broker: Broker, channel: AbstractChannel, name: str, *, prefetch: int, idle: float) -> None:
        self._broker = broker
        self._channel = channel
        self.name = name
        self._prefetch = prefetch
        self._idle = idle
        self._buffer: asyncio.Queue[Delivery] = asyncio.Queue()
        self._tag: str | None = None
        self._closed = False
        self._check = asyncio.Lock()
        self.backlog: int | None = None  # ranges ready when we started consuming
        # acks: delivery tags in delivery order, those done with, those acked alone
        self._unacked: deque[int] = deque()
        self._done: set[int] = set()
        self._acked_alone: set[int] = set()
        self._received = 0  # deliveries so far (before the first, an empty buffer says nothing)

    async def start(self, *, consume: bool = True) -> None:
        """Look at the queue (``backlog``), and consume it unless told not to yet."""
        self.backlog = await self.ready()
        if consume:
            await self.consume()

    async def resume(self) -> None:
        """Consume again: new work arrived in a job we still hold."""
        if self._tag is None and not self._closed:
            self.backlog = await self.ready()
            await self.consume()

    async def consume(self) -> None:
        if self._tag is None and not self._closed and self.backlog is not None:
            try:
                # straight through aiormq, as for publishing: at ranges of one event, an
                # aio_pika.IncomingMessage and the task that hands it over cost the worker
                # more than the range's own bookkeeping
                channel = await self._channel.get_underlay_channel()
                tag = f"es.{self.name}.{next(_consumer_ids)}"
                fastpath.deliver_directly(channel, tag, self._deliver_now)
                ok = await channel.basic_consume(
                    self.name, self._deliver, no_ack=False, consumer_tag=tag, timeout=RPC_SECONDS
                )
                self._tag = ok.consumer_tag
            except (aiormq.exceptions.AMQPError, aio_pika.exceptions.ChannelInvalidStateError, RuntimeError) as exc:
                # the job ended meanwhile (its queue deleted): ``get`` says there is nothing
                log.debug("job queue unavailable", extra={"queue": self.name, "error": repr(exc)})

    @property
    def channel(self) -> AbstractChannel:
        """The channel this consumer lives on (closing it gives its unacked ranges back)."""
        return self._channel

    @property
    def idle(self) -> bool:
        """No range delivered and waiting for a slot."""
        return self._buffer.empty()

    @property
    def full(self) -> bool:
        # one acked alone stays in ``_unacked`` until the ranges before it are acked
        return len(self._unacked) - len(self._acked_alone) >= self._prefetch

    async def _deliver(self, message: DeliveredMessage) -> None:
        """aiormq's way: a task per delivery (where ``fastpath.deliver_directly`` is off)."""
        self._deliver_now(message)

    def _deliver_now(self, message: DeliveredMessage) -> None:
        deliver = message.delivery
        assert isinstance(deliver, spec.Basic.Deliver)
        # kept in order even if deliveries' tasks ran out of order: a multiple ack must
        # never cover a range still running
        tag = deliver.delivery_tag or 0
        bisect.insort(self._unacked, tag)
        self._received += 1
        headers = message.header.properties.headers or {}
        # even while closing: close() gives it back
        self._buffer.put_nowait(Delivery(message.body, tag, bool(deliver.redelivered), headers))

    async def ack(self, message: Delivery) -> None:
        """Ack a range this queue delivered. Ranges whose statuses one batch confirmed
        are acked together: one basic.ack with ``multiple`` up to the last of them once
        every earlier delivery is done with (at ranges of one event, an ack frame per
        range cost the worker and RabbitMQ as much as the range). A range done before
        an earlier one (still running) is acked alone, so that it frees its prefetch."""
        tag = message.delivery_tag
        self._done.add(tag)
        await asyncio.sleep(0)  # the other slots woken by the same confirm add theirs
        upto = None
        while self._unacked and (self._unacked[0] in self._done or self._unacked[0] in self._acked_alone):
            head = self._unacked.popleft()
            if head in self._done:
                upto = head  # never one acked alone: RabbitMQ would not know that tag
            self._done.discard(head)
            self._acked_alone.discard(head)
        alone = tag in self._done  # behind a range still running
        if alone:
            self._done.discard(tag)
            self._acked_alone.add(tag)
        # wait=False: the frames are queued at once, in this order, with the state above
        # (an ack overtaken by a later multiple one would name a tag RabbitMQ forgot)
        channel = await self._channel.get_underlay_channel()
        if upto is not None:
            await channel.basic_ack(upto, multiple=True, wait=False)
        if alone:
            await channel.basic_ack(tag, wait=False)

    async def ready(self) -> int | None:
        """Ranges ready in the queue (not counting unacked ones), None if it is gone."""
        if self._channel.is_closed:
            return None
        try:
            queue = await self._channel.declare_queue(self.name, passive=True, timeout=RPC_SECONDS)
        except (aiormq.exceptions.AMQPError, aio_pika.exceptions.ChannelInvalidStateError, RuntimeError) as exc:
            # the job ended and its queue was deleted, or the connection dropped
            log.debug("job queue unavailable", extra={"queue": self.name, "error": repr(exc)})
            return None
        return queue.declaration_result.message_count

    async def get(self) -> Delivery | None:
        """The next range, or None when the job has none left for us (or its queue is gone)."""
        wait = not self._starved()
        while True:
            if not self._buffer.empty():
                return self._buffer.get_nowait()
            if self._tag is None or self._channel.is_closed:
                return None
            if wait:
                try:
                    async with asyncio.timeout(self._idle):
                        return await self._buffer.get()
                except TimeoutError:
                    pass
            wait = True
            async with self._check:  # one slot asks; the others find the answer
                if self._tag is not None and self._buffer.empty() and not await self.ready():
                    # a classic queue sends every delivery before the cancel's answer:
                    # they land in the buffer and are served first
                    await self.stop_consuming()

    def _starved(self) -> bool:
        """Nothing at hand although RabbitMQ may send more (fewer unacked than the
        prefetch): the queue is likely empty, so it is asked at once rather than after
        ``idle`` seconds (at a job's end that wait was most of a job switch)."""
        return self._received > 0 and self.idle and not self.full

    async def stop_consuming(self) -> None:
        tag, self._tag = self._tag, None
        if tag is not None and not self._channel.is_closed:
            with contextlib.suppress(aiormq.exceptions.AMQPError, RuntimeError):
                channel = await self._channel.get_underlay_channel()
                await channel.basic_cancel(tag)
                # a quorum queue may still deliver to us after the cancel's answer
                # (ranges it had checked out to us, on their way): aiormq drops a
                # delivery of a consumer it no longer knows, and the range sat unacked
                # until the channel closed, then came back flagged redelivered, was
                # returned instead of run and issued again (hundreds per run with
                # --prefetch 256). Kept instead: in the buffer, served while the job is
                # held, given back with the channel otherwise.
                if isinstance(channel, aiormq.Channel):
                    channel.consumers.setdefault(tag, self._deliver)

    async def close(self, *, give_back: bool = True) -> None:
        """Stop consuming; ranges delivered but never started go back to the queue when
        the channel closes, unacked (they come back flagged ``redelivered`` and are
        returned to the control plane, which finds them queued and charges nothing), or,
        ``give_back=False``, are acked and dropped: their job was cancelled."""
        self._closed = True
        await self.stop_consuming()
        for _ in range(4):  # deliveries read before the cancel's answer: let them land
            await asyncio.sleep(0)
        while not give_back and not self._buffer.empty():
            with contextlib.suppress(Exception):
                await self.ack(self._buffer.get_nowait())
        if not self._channel.is_closed:
            with contextlib.suppress(aiormq.exceptions.AMQPError, RuntimeError):
                await self._channel.close()


class Broker(Transport):
    """Two connections: a robust one, which aio-pika restores after a broker restart with
    its consumers and the fixed topology, for consuming and publishing; and a plain one,
    opened again on demand, for short-lived work (a job's queue, passive checks), which
    a restore must not replay (it would re-create deleted job queues).

    Given the nodes of a cluster (several URLs), both connect to the first that answers,
    and move on to the next when theirs is lost or keeps refusing: a worker whose node
    dies carries on through another within seconds."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        names: Names,
        urls: list[str],
        client: str,
        *,
        current: int = 0,
        queue_type: str = "quorum",
    ) -> None:
        self.connection = connection
        self.names = names
        self._urls = urls
        self._current = current  # the node the robust connection uses (or tries next)
        self._client = client
        self._publisher: AbstractChannel | None = None
        self._reopen = asyncio.Lock()
        self._plain: AbstractConnection | None = None
        self._admin: AbstractChannel | None = None
        self._looker: AbstractChannel | None = None
        self._getter: AbstractChannel | None = None
        self._deleter: AbstractChannel | None = None
        self._looking = asyncio.Lock()
        self._next_channel: asyncio.Future[tuple[AbstractChannel, int]] | None = None
        self._failover: asyncio.Task[None] | None = None
        self._closing = False
        self._queue_type = queue_type
        self._declared: dict[str, dict[str, Any] | None] = {}  # fixed queues: their arguments (None: as found)

    @classmethod
    async def connect(
        cls, url: str, names: Names, *, client: str = "dispatcher", queue_type: str = "quorum"
    ) -> Broker:
        """``url``: one AMQP URL, or several comma-separated, tried in turn. ``queue_type``:
        of the durable queues it declares, quorum (replicated) or classic."""
        if queue_type not in QUEUE_TYPES:
            raise ValueError(f"queue type must be one of {', '.join(QUEUE_TYPES)}, not {queue_type!r}")
        urls = [with_heartbeat(u) for u in split_urls(url)]
        log.info("connecting to RabbitMQ", extra={"url": redact(url)})
        for i, node in enumerate(urls):
            try:
                connection = await aio_pika.connect_robust(
                    node, client_properties={"connection_name": client}, reconnect_interval=RECONNECT_SECONDS
                )
            except Exception as exc:
                if not is_outage(exc) or i == len(urls) - 1:
                    raise
                log.warning("RabbitMQ node unavailable: trying another", extra={"url": redact(node), "error": str(exc)})
                continue
            broker = cls(connection, names, urls, client, current=i, queue_type=queue_type)
            await broker._channel()
            if len(urls) > 1:
                broker._watch()
            return broker
        raise AssertionError("unreachable: the last node's failure is raised")

    def _watch(self) -> None:
        """Move the robust connection to the next node when it loses its own, and again
        while it cannot reconnect (aio-pika retries the URL it is given)."""
        self.connection.close_callbacks.add(lambda _connection, _exc: self._next_node())
        self._failover = asyncio.ensure_future(self._keep_moving())

    def _next_node(self) -> None:
        if self._closing or self.connection.is_closed:
            return  # closed by us: nothing to restore
        self._current = (self._current + 1) % len(self._urls)
        assert isinstance(self.connection, aio_pika.RobustConnection)
        self.connection.url = URL(self._urls[self._current])  # its next attempt's (aio-pika reads it each time)
        log.warning("RabbitMQ connection lost: trying the next node", extra={"url": redact(self._urls[self._current])})

    async def _keep_moving(self) -> None:
        tried_at = time.monotonic()
        while not self.connection.is_closed:
            await asyncio.sleep(RECONNECT_SECONDS / 2)
            if self.connection.connected.is_set():
                tried_at = time.monotonic()
            elif time.monotonic() - tried_at > 1.5 * RECONNECT_SECONDS:  # it had its try at this node
                self._next_node()
                tried_at = time.monotonic()

    async def close(self) -> None:
        self._closing = True
        if self._failover is not None:
            self._failover.cancel()
        if self._next_channel is not None:
            self._next_channel.cancel()
            with contextlib.suppress(BaseException):
                await self._next_channel
        if self._plain is not None and not self._plain.is_closed:
            await self._plain.close()
        await self.connection.close()

    async def channel(self) -> AbstractChannel:
        """A channel of its own on the plain connection (close it when done)."""
        async with self._reopen:
            if self._plain is not None and not self._plain.is_closed:
                try:
                    return await self._plain.channel()
                except (aiormq.exceptions.AMQPError, RuntimeError):
                    pass  # lost with the broker: connect again below
            self._plain = await self._connect_plain()
            return await self._plain.channel()

    async def _connect_plain(self) -> AbstractConnection:
        """The plain connection, to the robust one's node first, then to the others."""
        order = self._urls[self._current :] + self._urls[: self._current]
        for i, node in enumerate(order):
            try:
                return await aio_pika.connect(node, client_properties={"connection_name": self._client})
            except Exception as exc:
                if not is_outage(exc) or i == len(order) - 1:
                    raise
        raise AssertionError("unreachable: the last node's failure is raised")

    async def _admin_channel(self) -> AbstractChannel:
        if self._admin is None or self._admin.is_closed:
            self._admin = await self.channel()
        return self._admin

    async def declare_topology(self) -> None:
        """Declare every fixed queue and exchange (idempotent; the control plane calls
        it, and tests; a worker's user may declare none of it)."""
        for name in (self.names.jobs, self.names.status, self.names.dlq, self.names.dead_ranges):
            await self._declare_durable(name)
        for step in DELAY_STEPS_MS:
            # on expiry a message goes back through the default exchange, under the
            # routing key it was published with: its job's queue, or es.jobs
            await self._declare_durable(self.names.retry(step), {"x-message-ttl": step, "x-dead-letter-exchange": ""})
        ch = await self._admin_channel()
        # statuses come in through an exchange of their own: a worker's user may write to
        # it and to nothing else
        status = await ch.declare_exchange(self.names.status_exchange, aio_pika.ExchangeType.FANOUT, durable=True)
        await (await ch.get_queue(self.names.status, ensure=False)).bind(status)
        delay = await ch.declare_exchange(self.names.delay, aio_pika.ExchangeType.HEADERS, durable=True)
        for step in DELAY_STEPS_MS:
            queue = await ch.get_queue(self.names.retry(step), ensure=False)
            await queue.bind(delay, arguments={"x-match": "all", DELAY_HEADER: str(step)})
        await ch.declare_exchange(self.names.control, aio_pika.ExchangeType.FANOUT, durable=True)

    def _arguments(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """A durable queue's arguments: quorum queues (replicated on a cluster), their
        leaders spread over its nodes, unless classic ones were asked for."""
        arguments = dict(extra or {})
        if self._queue_type == "quorum":
            arguments |= {"x-queue-type": "quorum", "x-queue-leader-locator": "balanced"}
        return arguments

    async def _declare_durable(self, name: str, extra: dict[str, Any] | None = None) -> None:
        arguments = self._arguments(extra)
        ch = await self._admin_channel()
        try:
            await ch.declare_queue(name, durable=True, arguments=arguments, timeout=RPC_SECONDS)
            self._declared[name] = arguments
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            # declared before with other arguments (a classic queue of a deployment from
            # before quorum queues were the default, say): used as it is
            log.warning("queue exists with other arguments: used as it is", extra={"queue": name, "error": str(exc)})
            await (await self._admin_channel()).declare_queue(name, passive=True, timeout=RPC_SECONDS)
            self._declared[name] = None

    async def delete_topology(self) -> None:
        """Remove every fixed queue and exchange (tests; a user's purge)."""
        ch = await self._channel()
        for name in self.names.fixed_queues():
            await ch.queue_delete(name)
        for exchange in (self.names.delay, self.names.control, self.names.status_exchange):
            await ch.exchange_delete(exchange)

    async def _channel(self) -> AbstractChannel:
        """The publishing channel, opened again if RabbitMQ closed it (a channel error
        such as a cancelled RPC closes it; the connection stays)."""
        async with self._reopen:
            if self._publisher is None or self._publisher.is_closed:
                self._publisher = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
            return self._publisher

    # -- publishing -------------------------------------------------------------------

    async def publish(self, routing_key: str, body: bytes, *, headers: Mapping[str, Any] | None = None) -> None:
        """Publish persistently to a queue; returns once RabbitMQ confirmed it."""
        await self._publish("", routing_key, body, headers)

    async def publish_status(self, body: bytes) -> None:
        """A worker's status batch, through the status exchange (confirmed)."""
        await self._publish(self.names.status_exchange, "", body, None)

    async def publish_delayed(self, routing_key: str, body: bytes, seconds: float) -> None:
        """Publish so that the message reaches ``routing_key`` after about ``seconds``
        (one of DELAY_STEPS_MS): it waits in a delay queue, never in a consumer."""
        await self._publish(self.names.delay, routing_key, body, {DELAY_HEADER: str(delay_step(seconds))})

    async def _publish(self, exchange: str, routing_key: str, body: bytes, headers: Mapping[str, Any] | None) -> None:
        # straight to aiormq: an aio_pika.Message and its conversion cost more CPU than
        # the rest of a publish (a range of one event is one publish); an unroutable
        # message raises (mandatory, on_return_raises), a nack raises DeliveryError
        ch = self._publisher
        if ch is None or ch.is_closed:
            ch = await self._channel()
        underlay = await ch.get_underlay_channel()
        properties = fastpath.properties(dict(headers) if headers else None)
        # wait=False: queued for the socket without waiting for it to drain, so that
        # concurrent publishes share writes; the confirm is still awaited
        await underlay.basic_publish(
            body, exchange=exchange, routing_key=routing_key, properties=properties, mandatory=True, wait=False  # type: ignore[call-arg]
        )

    async def broadcast(self, body: bytes) -> None:
        """To every worker listening on es.control (none listening is fine)."""
        ch = await self._channel()
        exchange = await ch.get_exchange(self.names.control, ensure=False)
        await exchange.publish(aio_pika.Message(body, content_type="application/json"), routing_key="", mandatory=False)

    async def listen_control(self, handler: Handler) -> None:
        """A worker's private queue on es.control; it goes away with the connection."""
        ch = await self.connection.channel()
        queue = await ch.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(self.names.control)
        await queue.consume(handler, no_ack=True)

    async def publish_many(self, items: Iterable[tuple[str, bytes]]) -> None:
        """Publish persistently to queues, all in one write, and wait for every confirm
        (a nack raises DeliveryError, an unroutable message PublishError): see
        dispatcher.fastpath."""
        ch = self._publisher
        if ch is None or ch.is_closed:
            ch = await self._channel()
        await fastpath.publish_many(await ch.get_underlay_channel(), items)

    async def ack_all(self, messages: Iterable[Incoming]) -> None:
        """Ack deliveries: one ``basic.ack`` with ``multiple`` per channel, up to its last
        message here. The bookkeeper acks a transaction's messages together, and every
        earlier delivery on the channel is one it committed (or acked) already: a
        multiple ack covers exactly those."""
        last: dict[aiormq.abc.AbstractChannel, int] = {}
        for message in messages:
            assert isinstance(message, AbstractIncomingMessage), "acked on the connection that consumed it"
            try:
                channel = message.channel
            except aio_pika.exceptions.ChannelInvalidStateError:
                continue  # delivered on a channel lost since: RabbitMQ delivers it again
            if message.delivery_tag is not None:
                last[channel] = max(last.get(channel, 0), message.delivery_tag)
        for channel, tag in last.items():
            if not channel.is_closed:  # (its number may be another channel's by now)
                await channel.basic_ack(tag, multiple=True)

    # -- queues -----------------------------------------------------------------------

    async def declare_job_queue(self, name: str) -> None:
        dead_letters = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": self.names.dead_ranges}
        await self._declare_durable(name, dead_letters)
        self._declared.pop(name, None)  # (only the fixed queues are remembered)

    async def delete_queue(self, name: str, *, wait: bool = True) -> None:
        if wait:
            await (await self._admin_channel()).queue_delete(name, timeout=RPC_SECONDS)
            return
        # on a channel of its own, without waiting for the answer: a quorum queue's delete
        # takes seconds while one of its members is down, and blocks its channel meanwhile
        if self._deleter is None or self._deleter.is_closed:
            self._deleter = await self.channel()
        await self._deleter.queue_delete(name, nowait=True)

    async def purge_queue(self, name: str) -> None:
        """Drop the messages ready in a queue (not those delivered and unacked); a missing
        queue is declared (empty)."""
        await self.declare_job_queue(name)
        ch = await self._admin_channel()
        queue = await ch.get_queue(name, ensure=False)
        await queue.purge(timeout=RPC_SECONDS)

    async def queue_state(self, name: str) -> tuple[int, int] | None:
        """(messages ready, consumers) of a queue, or None if it does not exist."""
        looked = await self._look_at(name)
        return None if looked is None else (looked.message_count or 0, looked.consumer_count or 0)

    async def _look_at(self, name: str) -> spec.Queue.DeclareOk | None:
        """A passive declare, on a channel kept for it (the control plane looks at every
        active job's queue each second): a missing queue closes the channel, and the
        next look opens another."""
        async with self._looking:
            if self._looker is None or self._looker.is_closed:
                self._looker = await self.channel()
            try:
                return (await self._looker.declare_queue(name, passive=True, timeout=RPC_SECONDS)).declaration_result
            except aiormq.exceptions.ChannelNotFoundEntity:
                return None

    async def open_job(self, name: str, *, prefetch: int = 1, idle: float = 0.01, consume: bool = True) -> JobQueue:
        queue = AmqpJobQueue(self, await self._job_channel(prefetch), name, prefetch=prefetch, idle=idle)
        await queue.start(consume=consume)
        return queue

    async def _job_channel(self, prefetch: int) -> AbstractChannel:
        """A new channel for a job (closing it is what returns to the queue a delivery
        that lands after the consumer stopped, so channels are never reused). The next
        one is opened in the background: opening it and setting its prefetch were two of
        a job switch's round trips."""
        ready, self._next_channel = self._next_channel, None
        channel = None
        if ready is not None:
            with contextlib.suppress(Exception):  # lost with the broker: open one now
                channel, its_prefetch = await ready
                if channel.is_closed or its_prefetch != prefetch:
                    channel = None
        if channel is None:
            channel = await self._open_job_channel(prefetch)
        self._next_channel = asyncio.ensure_future(self._fresh_job_channel(prefetch))
        return channel

    async def _open_job_channel(self, prefetch: int) -> AbstractChannel:
        channel = await self.channel()
        await channel.set_qos(prefetch_count=prefetch)
        return channel

    async def _fresh_job_channel(self, prefetch: int) -> tuple[AbstractChannel, int]:
        return await self._open_job_channel(prefetch), prefetch

    async def consume(self, queue_name: str, handler: Handler, *, prefetch: int) -> Callable[[], Awaitable[None]]:
        """Consume with bounded prefetch; returns a coroutine function that stops it."""
        ch = await self.connection.channel()
        await ch.set_qos(prefetch_count=prefetch)
        # declared as declare_topology declared it (or looked up): the robust channel
        # restores the queue and its consumer after a broker restart
        arguments = self._declared.get(queue_name)
        if arguments is None:
            queue = await ch.declare_queue(queue_name, passive=True, timeout=RPC_SECONDS)
        else:
            queue = await ch.declare_queue(queue_name, durable=True, arguments=arguments, timeout=RPC_SECONDS)
        tag = await queue.consume(handler, no_ack=False)

        async def stop() -> None:
            if not ch.is_closed:
                await queue.cancel(tag)
                await ch.close()

        return stop

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        self.connection.reconnect_callbacks.add(lambda _connection: callback())

    async def announcements(self) -> AnnouncementsBase:
        ch = await self.connection.channel()
        await ch.set_qos(prefetch_count=1)
        # passive: the control plane declares it (a worker's user may not)
        return AmqpAnnouncements(await ch.declare_queue(self.names.jobs, passive=True))

    async def get(self, queue_name: str) -> Incoming | None:
        async with self._looking:  # (the getter's channel is opened as the looker's is)
            if self._getter is None or self._getter.is_closed:
                self._getter = await self.channel()
        queue = await self._getter.get_queue(queue_name, ensure=False)
        return await queue.get(no_ack=False, fail=False)

    async def check_topology(self) -> None:
        ch = await self.channel()
        try:
            # passive: needs no permission, creates nothing; a missing one raises
            await ch.declare_queue(self.names.jobs, passive=True)
            for exchange in (self.names.status_exchange, self.names.control):
                await ch.get_exchange(exchange, ensure=True)
        finally:
            if not ch.is_closed:
                await ch.close()


class AmqpAnnouncements(AnnouncementsBase):

    def __init__(self, queue: AbstractQueue) -> None:
        self._queue = queue
        self._cancelling: asyncio.Future[None] | None = None

    async def next(self) -> AbstractIncomingMessage:
        if self._cancelling is not None:  # the previous consumer's end (done by now, as a rule)
            await self._cancelling
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
            # not waited for: the announcement's job need not wait a round trip (one
            # delivered before the cancel's answer is given back above)
            self._cancelling = asyncio.ensure_future(self._cancel(tag))

    async def _cancel(self, tag: str) -> None:
        with contextlib.suppress(aiormq.exceptions.AMQPError, RuntimeError):
            await self._queue.cancel(tag)
