"""taskiq with taskiq-aio-pika on the same RabbitMQ, at their defaults: persistent messages,
a quorum queue, publisher confirms (aio-pika's channel default), the worker acks after the
task (``--ack-type when_saved``, and no result backend), qos 10, 2 worker processes."""

from __future__ import annotations

import asyncio
import os

from taskiq_aio_pika import AioPikaBroker, Exchange, Queue

from benchmarks.peers import counter

QUEUE = os.environ.get("BENCH_PEERS_QUEUE", "bench.peers.taskiq")
broker = AioPikaBroker(
    os.environ.get("BENCH_PEERS_AMQP", "amqp://guest:guest@127.0.0.1:5672/"),
    exchange=Exchange(name=QUEUE),
    task_queues=[Queue(name=QUEUE)],
    dead_letter_queue=Queue(name=f"{QUEUE}.dead_letter"),
)


@broker.task(task_name="bench.peers.noop")
async def noop(payload: str) -> None:
    counter.done()


async def prepare() -> None:
    await broker.startup()


async def produce(n: int) -> None:
    for start in range(0, n, 1000):  # pipelined, 1,000 in flight, as a bulk producer would
        await asyncio.gather(*(noop.kiq("x") for _ in range(min(1000, n - start))))
    await broker.shutdown()
