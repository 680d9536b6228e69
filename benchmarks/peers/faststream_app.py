"""FastStream (RabbitBroker, on aio-pika) on the same RabbitMQ at its defaults: publisher
confirms on, no prefetch limit, acks after the handler (AckPolicy.REJECT_ON_ERROR). Its
defaults are not durable, so the queue is declared durable and messages are published
with ``persist=True`` (persistent), as the comparison asks of every peer."""

from __future__ import annotations

import asyncio
import os

from faststream import FastStream
from faststream.rabbit import RabbitBroker, RabbitQueue

from benchmarks.peers import counter

QUEUE = RabbitQueue(os.environ.get("BENCH_PEERS_QUEUE", "bench.peers.faststream"), durable=True)
broker = RabbitBroker(os.environ.get("BENCH_PEERS_AMQP", "amqp://guest:guest@127.0.0.1:5672/"), log_level=30)
app = FastStream(broker)


@broker.subscriber(QUEUE)
async def noop(payload: str) -> None:
    counter.done()


async def prepare() -> None:
    await broker.connect()


async def produce(n: int) -> None:
    for start in range(0, n, 1000):  # pipelined, 1,000 in flight, as a bulk producer would
        await asyncio.gather(*(broker.publish("x", queue=QUEUE, persist=True) for _ in range(min(1000, n - start))))
    await broker.stop()
