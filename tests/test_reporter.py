"""The worker's status reporter against the real RabbitMQ: what one batch carries."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from schemas.messages import StatusBatch, StatusUpdate, decode
from tests.test_broker import drain
from transport.rabbitmq import Broker
from workers.reporter import StatusReporter

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def update(status: str, attempt: int = 1) -> StatusUpdate:
    return StatusUpdate(job_id=1, number=7, attempt=attempt, status=status, worker="w", started_at=T0)  # type: ignore[arg-type]


async def test_a_late_running_update_never_replaces_its_final_one(broker: Broker) -> None:
    # a worker queues an event's 'running' just after its payload started; a payload
    # that ends without suspending has its final update queued first
    reporter = StatusReporter(broker, "w")
    confirmed = reporter.report([update("finished")])
    reporter.running(update("running"))
    reporter.running(update("running", attempt=2))  # another attempt: its own update
    await reporter.flush()
    assert confirmed.done()
    [(body, _, _)] = await drain(broker, broker.names.status)
    batch = decode(body, StatusBatch)
    assert sorted((u.attempt, u.status) for u in batch.updates) == [(1, "finished"), (2, "running")]


async def test_a_hurried_reporter_sends_the_next_report_without_lingering(broker: Broker) -> None:
    # a slot with nothing to run hurries the reporter before the ranges it ran are
    # reported (in the background): their batch must leave at once, not after the linger
    reporter = StatusReporter(broker, "w", linger=3600)
    running = asyncio.create_task(reporter.run())
    try:
        reporter.hurry()
        await asyncio.sleep(0)
        confirmed = reporter.report([update("finished")])
        async with asyncio.timeout(30):  # a guard: without the hurry this waits an hour
            await confirmed
    finally:
        running.cancel()
    [(body, _, _)] = await drain(broker, broker.names.status)
    assert [u.status for u in decode(body, StatusBatch).updates] == ["finished"]
