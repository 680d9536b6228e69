"""Celery on the same RabbitMQ (py-amqp): persistent messages (Celery's default), acks late,
results ignored; the prefetch multiplier from BENCH_PEERS_PREFETCH (Celery's default 4; with
the solo pool, a worker's prefetch), publisher confirms (``confirm_publish``) only with
BENCH_PEERS_CONFIRMS=1. benchmarks/celery_app.py is run.py's; this one counts completions."""

from __future__ import annotations

import os

from celery import Celery

from benchmarks.peers import counter

QUEUE = os.environ.get("BENCH_PEERS_QUEUE", "bench.peers.celery")
app = Celery("bench-peers", broker=os.environ.get("BENCH_PEERS_AMQP", "amqp://guest:guest@127.0.0.1:5672//"))
app.conf.update(
    task_acks_late=True,
    task_ignore_result=True,
    worker_prefetch_multiplier=int(os.environ.get("BENCH_PEERS_PREFETCH", "4")),
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    broker_transport_options={"confirm_publish": True} if os.environ.get("BENCH_PEERS_CONFIRMS") == "1" else {},
)


@app.task(name="bench.peers.noop")  # type: ignore[untyped-decorator]
def noop(payload: str) -> None:
    counter.done()


def prepare() -> None:
    with app.pool.acquire(block=True) as conn:  # the producer's pooled connection, connected
        conn.ensure_connection()


def produce(n: int) -> None:
    for _ in range(n):
        noop.apply_async(("x",), queue=QUEUE)
