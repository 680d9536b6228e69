"""The transport in process, for unit tests of the worker, bookkeeper and releaser that
need no RabbitMQ (after dramatiq's ``StubBroker`` and procrastinate's
``InMemoryConnector``).

It keeps the semantics the code relies on (see ``transport.interface``), not just the
calls: a consumer gets at most ``prefetch`` unacked messages; what a connection leaves
unacked goes back to its queue when the connection closes and comes again flagged
``redelivered``; a delayed message waits in its delay queue for its step (scaled by
``delay_scale``) and then reaches its queue; a rejected range goes to the dead-ranges
queue with an ``x-death`` header; a message no queue takes raises ``Unroutable``.

One ``MemoryBroker`` is the broker; each ``connect()`` is a client's connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from transport.interface import (
    DELAY_HEADER,
    Announcements,
    Delivery,
    Handler,
    Incoming,
    JobQueue,
    Transport,
)
from transport.names import Names
from transport.policy import DELAY_STEPS_MS, delay_step


class Unroutable(Exception):
    """A mandatory publish that no queue took."""


class NotFound(LookupError):
    """A queue or exchange that does not exist."""


class Closed(ConnectionError):
    """The connection is closed (an outage to the code above: ``is_outage`` says so)."""


@dataclass
class Message:
    body: bytes
    headers: dict[str, Any]
    routing_key: str  # as published: where a delay queue sends it on
    redelivered: bool = False


@dataclass
class Queue:
    name: str
    dead_letter_to: str | None = None  # a queue, through the default exchange
    ttl_ms: int | None = None  # expired messages go on to their routing key
    owner: Connection | None = None  # exclusive: gone with its connection
    ready: deque[Message] = field(default_factory=deque)
    consumers: list[Consumer] = field(default_factory=list)
    turn: int = 0  # whose turn it is among the consumers with room


@dataclass
class Exchange:
    name: str
    kind: str  # fanout | headers
    bindings: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


class Consumer:
    """A consumer, or a connection's basic.get: it holds what it was given until acked."""

    def __init__(self, broker: MemoryBroker, connection: Connection, queue: Queue, prefetch: int) -> None:
        self.broker = broker
        self.connection = connection
        self.queue = queue
        self.prefetch = prefetch  # 0: unlimited
        self.active = False
        self.unacked: dict[int, Message] = {}
        self.on_message: Callable[[int, Message], None] = lambda tag, message: None
        connection.consumers.append(self)

    @property
    def has_room(self) -> bool:
        return self.active and (self.prefetch == 0 or len(self.unacked) < self.prefetch)

    def start(self, on_message: Callable[[int, Message], None]) -> None:
        self.on_message = on_message
        self.active = True
        self.queue.consumers.append(self)
        self.broker.dispatch(self.queue)

    def give(self, message: Message) -> int:
        tag = next(self.broker.tags)
        self.unacked[tag] = message
        return tag

    def cancel(self) -> None:
        """Take no more messages (those given stay unacked, as after a basic.cancel)."""
        self.active = False
        with contextlib.suppress(ValueError):
            self.queue.consumers.remove(self)

    def ack(self, tag: int) -> None:
        if self.connection.closed:
            raise Closed("channel closed")
        if self.unacked.pop(tag, None) is None:
            raise LookupError(f"unknown delivery tag {tag}")
        self.broker.dispatch(self.queue)

    def nack(self, tag: int, *, requeue: bool) -> None:
        if self.connection.closed:
            raise Closed("channel closed")
        message = self.unacked.pop(tag)
        if requeue:
            self.broker.requeue(self.queue, [message])
        else:
            self.broker.reject(self.queue, message)
        self.broker.dispatch(self.queue)

    def close(self) -> None:
        """Everything unacked goes back to the queue, flagged redelivered."""
        self.cancel()
        messages, self.unacked = list(self.unacked.values()), {}
        self.broker.requeue(self.queue, messages)


@dataclass(frozen=True)
class Received:
    """An ``Incoming`` message of ``consume``, ``listen_control`` and ``get``."""

    consumer: Consumer
    tag: int
    message: Message

    @property
    def body(self) -> bytes:
        return self.message.body

    @property
    def headers(self) -> Mapping[str, Any]:
        return self.message.headers

    @property
    def redelivered(self) -> bool:
        return self.message.redelivered

    async def ack(self) -> None:
        self.consumer.ack(self.tag)

    async def nack(self, *, requeue: bool = True) -> None:
        self.consumer.nack(self.tag, requeue=requeue)


class MemoryBroker:
    """The broker's state: queues, exchanges, and the connections' consumers."""

    def __init__(self, *, delay_scale: float = 1.0) -> None:
        self.delay_scale = delay_scale
        self.queues: dict[str, Queue] = {}
        self.exchanges: dict[str, Exchange] = {}
        self.tags = itertools.count(1)

    def connect(self, names: Names) -> Connection:
        return Connection(self, names)

    def queue(self, name: str) -> Queue:
        try:
            return self.queues[name]
        except KeyError:
            raise NotFound(f"no queue {name!r}") from None

    def declare(self, name: str, **options: Any) -> Queue:
        if name not in self.queues:
            self.queues[name] = Queue(name, **options)
        return self.queues[name]

    def delete(self, name: str) -> None:
        queue = self.queues.pop(name, None)
        if queue is not None:
            for consumer in list(queue.consumers):
                consumer.cancel()

    def route(self, exchange: str, routing_key: str, headers: Mapping[str, Any]) -> list[Queue]:
        if exchange == "":
            return [self.queues[routing_key]] if routing_key in self.queues else []
        ex = self.exchanges.get(exchange)
        if ex is None:
            raise NotFound(f"no exchange {exchange!r}")
        names = [
            q
            for q, args in ex.bindings
            if ex.kind == "fanout" or all(headers.get(k) == v for k, v in args.items() if k != "x-match")
        ]
        return [self.queues[q] for q in names if q in self.queues]

    def publish(
        self, exchange: str, routing_key: str, body: bytes, headers: Mapping[str, Any] | None, *, mandatory: bool
    ) -> None:
        queues = self.route(exchange, routing_key, headers or {})
        if not queues and mandatory:
            raise Unroutable(f"no queue takes {routing_key!r} through exchange {exchange!r}")
        for queue in queues:
            self.put(queue, Message(body, dict(headers or {}), routing_key))

    def put(self, queue: Queue, message: Message) -> None:
        queue.ready.append(message)
        if queue.ttl_ms is not None:
            asyncio.get_running_loop().call_later(queue.ttl_ms / 1000 * self.delay_scale, self.expire, queue, message)
        self.dispatch(queue)

    def expire(self, queue: Queue, message: Message) -> None:
        """A delay queue's message at the end of its TTL: on to the queue it was for
        (dropped if that is gone, as RabbitMQ drops it)."""
        with contextlib.suppress(ValueError):
            queue.ready.remove(message)
            if message.routing_key in self.queues:
                self.put(self.queues[message.routing_key], Message(message.body, message.headers, message.routing_key))

    def requeue(self, queue: Queue, messages: list[Message]) -> None:
        if self.queues.get(queue.name) is not queue:
            return  # deleted meanwhile: gone with it
        for message in reversed(messages):
            message.redelivered = True
            queue.ready.appendleft(message)
        self.dispatch(queue)

    def reject(self, queue: Queue, message: Message) -> None:
        if queue.dead_letter_to is not None and queue.dead_letter_to in self.queues:
            death = {"queue": queue.name, "reason": "rejected", "count": 1}
            headers = {**message.headers, "x-death": [death, *message.headers.get("x-death", [])]}
            self.put(self.queues[queue.dead_letter_to], Message(message.body, headers, queue.dead_letter_to))

    def unacked(self, name: str) -> int:
        """Messages of a queue its consumers hold unacked (for tests)."""
        queue = self.queues.get(name)
        return 0 if queue is None else sum(len(c.unacked) for c in queue.consumers)

    def dispatch(self, queue: Queue) -> None:
        """Hand ready messages to consumers with room, in turn."""
        while queue.ready:
            ready = [c for c in queue.consumers if c.has_room]
            if not ready:
                return
            consumer = ready[queue.turn % len(ready)]
            queue.turn += 1
            message = queue.ready.popleft()
            consumer.on_message(consumer.give(message), message)


class MemoryJobQueue(JobQueue):
    def __init__(self, connection: Connection, name: str, *, prefetch: int, idle: float) -> None:
        self.connection = connection
        self.name = name
        self.backlog = None
        self._prefetch = prefetch
        self._idle = idle
        self._consumer: Consumer | None = None
        self._buffer: asyncio.Queue[Delivery] = asyncio.Queue()
        self._closed = False

    def _ready(self) -> int | None:
        queue = self.connection.broker.queues.get(self.name)
        return None if queue is None else len(queue.ready)

    async def start(self, *, consume: bool) -> None:
        self.backlog = self._ready()
        if consume:
            await self.consume()

    @property
    def idle(self) -> bool:
        return self._buffer.empty()

    @property
    def full(self) -> bool:
        return self._consumer is not None and len(self._consumer.unacked) >= self._prefetch

    async def consume(self) -> None:
        if (self._consumer is not None and self._consumer.active) or self._closed or self.backlog is None:
            return
        queue = self.connection.broker.queues.get(self.name)
        if queue is None:
            return
        if self._consumer is None:
            self._consumer = Consumer(self.connection.broker, self.connection, queue, self._prefetch)

        def on_message(tag: int, message: Message) -> None:
            self._buffer.put_nowait(Delivery(message.body, tag, message.redelivered, message.headers))

        self._consumer.start(on_message)

    async def resume(self) -> None:
        if not self._closed and (self._consumer is None or not self._consumer.active):
            self.backlog = self._ready()
            await self.consume()

    async def get(self) -> Delivery | None:
        while True:
            if not self._buffer.empty():
                return self._buffer.get_nowait()
            if self._consumer is None or not self._consumer.active or self.connection.closed:
                return None
            if not self._ready():  # nothing ready: what we hold unacked is not for this slot
                await self.stop_consuming()
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._idle):
                    return await self._buffer.get()

    async def ack(self, message: Delivery) -> None:
        if self._consumer is not None:
            self._consumer.ack(message.delivery_tag)

    async def stop_consuming(self) -> None:
        if self._consumer is not None:
            self._consumer.cancel()

    async def close(self, *, give_back: bool = True) -> None:
        self._closed = True
        await self.stop_consuming()
        while not give_back and not self._buffer.empty():
            with contextlib.suppress(Exception):
                await self.ack(self._buffer.get_nowait())
        if self._consumer is not None:
            self._consumer.close()
            self.connection.consumers.remove(self._consumer)


class MemoryAnnouncements(Announcements):
    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    async def next(self) -> Incoming:
        broker = self.connection.broker
        consumer = Consumer(broker, self.connection, broker.queue(self.connection.names.jobs), prefetch=1)
        got: asyncio.Future[Incoming] = asyncio.get_running_loop().create_future()

        def on_message(tag: int, message: Message) -> None:
            consumer.cancel()  # one at a time
            got.set_result(Received(consumer, tag, message))

        consumer.start(on_message)
        try:
            return await got
        finally:
            consumer.cancel()


class Connection(Transport):
    """One client's connection to a ``MemoryBroker``. Closing it (as a worker's death
    would) gives back everything its consumers hold unacked."""

    def __init__(self, broker: MemoryBroker, names: Names) -> None:
        self.broker = broker
        self.names = names
        self.consumers: list[Consumer] = []
        self._getters: dict[str, Consumer] = {}  # basic.get's, by queue
        self.closed = False

    def _check(self) -> None:
        if self.closed:
            raise Closed("connection closed")

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for consumer in self.consumers:
            consumer.close()
        self.consumers = []
        for name, queue in list(self.broker.queues.items()):
            if queue.owner is self:
                self.broker.delete(name)

    # -- topology ---------------------------------------------------------------------

    async def declare_topology(self) -> None:
        self._check()
        n, b = self.names, self.broker
        for name in (n.jobs, n.status, n.dlq, n.dead_ranges):
            b.declare(name)
        b.exchanges.setdefault(n.status_exchange, Exchange(n.status_exchange, "fanout", [(n.status, {})]))
        delay = b.exchanges.setdefault(n.delay, Exchange(n.delay, "headers"))
        for step in DELAY_STEPS_MS:
            b.declare(n.retry(step), ttl_ms=step)
            binding = (n.retry(step), {"x-match": "all", DELAY_HEADER: str(step)})
            if binding not in delay.bindings:
                delay.bindings.append(binding)
        b.exchanges.setdefault(n.control, Exchange(n.control, "fanout"))

    async def delete_topology(self) -> None:
        n = self.names
        for name in n.fixed_queues():
            self.broker.delete(name)
        for exchange in (n.delay, n.control, n.status_exchange):
            self.broker.exchanges.pop(exchange, None)

    async def check_topology(self) -> None:
        self._check()
        self.broker.queue(self.names.jobs)
        for exchange in (self.names.status_exchange, self.names.control):
            if exchange not in self.broker.exchanges:
                raise NotFound(f"no exchange {exchange!r}")

    # -- publishing -------------------------------------------------------------------

    async def publish(self, routing_key: str, body: bytes, *, headers: Mapping[str, Any] | None = None) -> None:
        self._check()
        self.broker.publish("", routing_key, body, headers, mandatory=True)
        await asyncio.sleep(0)  # a publish is never free of a suspension

    async def publish_many(self, items: Iterable[tuple[str, bytes]]) -> None:
        for routing_key, body in items:
            self._check()
            self.broker.publish("", routing_key, body, None, mandatory=True)
        await asyncio.sleep(0)

    async def publish_status(self, body: bytes) -> None:
        self._check()
        self.broker.publish(self.names.status_exchange, "", body, None, mandatory=True)
        await asyncio.sleep(0)

    async def publish_delayed(self, routing_key: str, body: bytes, seconds: float) -> None:
        self._check()
        headers = {DELAY_HEADER: str(delay_step(seconds))}
        self.broker.publish(self.names.delay, routing_key, body, headers, mandatory=True)
        await asyncio.sleep(0)

    async def broadcast(self, body: bytes) -> None:
        self._check()
        self.broker.publish(self.names.control, "", body, None, mandatory=False)
        await asyncio.sleep(0)

    # -- consuming --------------------------------------------------------------------

    def _consumer(self, queue: Queue, handler: Handler, prefetch: int, *, no_ack: bool = False) -> Consumer:
        consumer = Consumer(self.broker, self, queue, prefetch)
        tasks: set[asyncio.Future[None]] = set()

        def on_message(tag: int, message: Message) -> None:
            received = Received(consumer, tag, message)
            if no_ack:
                consumer.unacked.pop(tag)
            # a task per delivery, as aio-pika runs its consumers' callbacks
            task: asyncio.Future[None] = asyncio.ensure_future(handler(received))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        consumer.start(on_message)
        return consumer

    async def consume(self, queue_name: str, handler: Handler, *, prefetch: int) -> Callable[[], Awaitable[None]]:
        self._check()
        consumer = self._consumer(self.broker.queue(queue_name), handler, prefetch)

        async def stop() -> None:
            consumer.close()

        return stop

    async def listen_control(self, handler: Handler) -> None:
        self._check()
        name = f"{self.names.control}.listener.{next(self.broker.tags)}"
        self.broker.declare(name, owner=self)
        exchange = self.broker.exchanges.get(self.names.control)
        if exchange is None:
            raise NotFound(f"no exchange {self.names.control!r}")
        exchange.bindings.append((name, {}))
        self._consumer(self.broker.queues[name], handler, 0, no_ack=True)

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        pass  # a connection in memory is never lost and restored: closed is closed

    async def announcements(self) -> Announcements:
        self._check()
        self.broker.queue(self.names.jobs)
        return MemoryAnnouncements(self)

    async def get(self, queue_name: str) -> Incoming | None:
        self._check()
        queue = self.broker.queue(queue_name)
        if not queue.ready:
            return None
        consumer = self._getters.get(queue_name)
        if consumer is None or consumer.queue is not queue:
            consumer = self._getters[queue_name] = Consumer(self.broker, self, queue, 0)
        message = queue.ready.popleft()
        return Received(consumer, consumer.give(message), message)

    async def ack_all(self, messages: Iterable[Incoming]) -> None:
        for message in messages:
            with contextlib.suppress(Closed):
                await message.ack()

    async def open_job(self, name: str, *, prefetch: int = 1, idle: float = 0.01, consume: bool = True) -> JobQueue:
        self._check()
        queue = MemoryJobQueue(self, name, prefetch=prefetch, idle=idle)
        await queue.start(consume=consume)
        return queue

    # -- queues -----------------------------------------------------------------------

    async def declare_job_queue(self, name: str) -> None:
        self._check()
        self.broker.declare(name, dead_letter_to=self.names.dead_ranges)

    async def delete_queue(self, name: str, *, wait: bool = True) -> None:
        self._check()
        self.broker.delete(name)

    async def purge_queue(self, name: str) -> None:
        await self.declare_job_queue(name)
        self.broker.queues[name].ready.clear()

    async def queue_state(self, name: str) -> tuple[int, int] | None:
        self._check()
        queue = self.broker.queues.get(name)
        return None if queue is None else (len(queue.ready), len(queue.consumers))
