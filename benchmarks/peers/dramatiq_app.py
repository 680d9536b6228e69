"""Dramatiq on the same RabbitMQ: its RabbitmqBroker (pika), persistent messages, acks after
the actor returns, no results middleware; publisher confirms only with BENCH_PEERS_CONFIRMS=1
(Dramatiq's default is without: ``confirm_delivery=False``)."""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from benchmarks.peers import counter

QUEUE = os.environ.get("BENCH_PEERS_QUEUE", "bench.peers.dramatiq")
broker = RabbitmqBroker(
    url=os.environ.get("BENCH_PEERS_AMQP", "amqp://guest:guest@127.0.0.1:5672/"),
    confirm_delivery=os.environ.get("BENCH_PEERS_CONFIRMS") == "1",
)
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE)
def noop(payload: str) -> None:
    counter.done()


def prepare() -> None:
    broker.connection  # noqa: B018 (connects: the clock starts with the producer connected)


def produce(n: int) -> None:
    for _ in range(n):
        noop.send("x")
