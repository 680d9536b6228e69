"""The Celery side of the comparison: the same no-op payload as a Celery task, on the
same RabbitMQ; acks late, results ignored (Celery keeps no per-task bookkeeping)."""

from __future__ import annotations

import os

from celery import Celery

app = Celery("bench", broker=os.environ.get("BENCH_CELERY_BROKER", "amqp://guest:guest@127.0.0.1:5672//"))
app.conf.update(
    task_acks_late=True,
    task_ignore_result=True,
    worker_prefetch_multiplier=4,
    task_default_queue=os.environ.get("BENCH_CELERY_QUEUE", "bench.celery"),
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="bench.noop")
def noop(payload: str) -> None:
    return None
