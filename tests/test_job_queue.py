"""A worker's consumer on a job's queue (dispatcher.broker.JobQueue) against the real
RabbitMQ: how it acks ranges."""

from __future__ import annotations

import asyncio
from typing import Any

from transport.rabbitmq import Broker, Delivery, JobQueue


async def opened(broker: Broker, n: int, *, prefetch: int, idle: float = 0.01) -> JobQueue:
    """A job queue holding ``range 0`` .. ``range n-1``, consumed."""
    name = broker.names.job(1)
    await broker.declare_job_queue(name)
    await broker.publish_many((name, f"range {i}".encode()) for i in range(n))
    return await broker.open_job(name, prefetch=prefetch, idle=idle)


async def delivered(broker: Broker, n: int) -> tuple[JobQueue, list[Delivery]]:
    jq = await opened(broker, n, prefetch=n)
    messages = []
    for _ in range(n):
        message = await jq.get()
        assert message is not None
        messages.append(message)
    return jq, messages


async def acks_sent(jq: JobQueue) -> list[tuple[int, bool]]:
    """Record the basic.ack frames the queue's channel sends (the real frames still go)."""
    sent: list[tuple[int, bool]] = []
    channel = await jq.channel.get_underlay_channel()
    real = channel.basic_ack

    async def basic_ack(tag: int, multiple: bool = False, **kwargs: Any) -> None:
        sent.append((tag, multiple))
        await real(tag, multiple=multiple, **kwargs)

    channel.basic_ack = basic_ack  # type: ignore[method-assign]
    return sent


async def settled(broker: Broker, jq: JobQueue) -> int | None:
    """Ranges back in the queue once the consumer's channel is closed: any not acked."""
    await asyncio.sleep(0.1)
    assert not jq.channel.is_closed, "an ack named a delivery tag RabbitMQ did not know"
    await jq.close(give_back=False)
    await asyncio.sleep(0.1)
    depth = await broker.queue_depth(jq.name)
    await broker.delete_queue(jq.name)
    return depth


async def test_ranges_confirmed_together_are_acked_in_one_frame(broker: Broker) -> None:
    jq, messages = await delivered(broker, 10)
    sent = await acks_sent(jq)
    await asyncio.gather(*(jq.ack(m) for m in messages))
    assert sent == [(messages[-1].delivery_tag, True)]
    assert await settled(broker, jq) == 0


async def test_a_range_done_behind_a_running_one_is_acked_alone(broker: Broker) -> None:
    jq, (first, second, third, fourth) = await delivered(broker, 4)
    sent = await acks_sent(jq)
    await jq.ack(second)  # the first is still running: the second must not wait for it
    await jq.ack(fourth)
    assert sent == [(second.delivery_tag, False), (fourth.delivery_tag, False)]
    await jq.ack(first)  # the prefix up to the first (the second was acked alone already)
    assert sent[2:] == [(first.delivery_tag, True)]
    await jq.ack(third)  # first..fourth all done: the last multiple names the third
    assert sent[3:] == [(third.delivery_tag, True)]
    assert await settled(broker, jq) == 0


async def test_ranges_not_acked_go_back_to_the_queue(broker: Broker) -> None:
    jq, messages = await delivered(broker, 5)
    await asyncio.gather(*(jq.ack(m) for m in messages[:2]), jq.ack(messages[3]))
    assert await settled(broker, jq) == 2  # the third and the fifth


async def test_a_queue_that_sent_less_than_the_prefetch_is_asked_at_once_whether_it_is_empty(
    broker: Broker,
) -> None:
    # an idle wait far longer than the test: only asking the queue at once can end it
    jq = await opened(broker, 3, prefetch=8, idle=3600)
    try:
        got = [await asyncio.wait_for(jq.get(), 30) for _ in range(3)]
        assert all(m is not None for m in got)
        # 3 unacked, prefetch 8: RabbitMQ would have sent a fourth; the queue says it is empty
        assert await asyncio.wait_for(jq.get(), 30) is None
        await asyncio.gather(*(jq.ack(m) for m in got if m is not None))
    finally:
        await jq.close(give_back=False)
        await broker.delete_queue(jq.name)


async def test_a_consumer_at_its_prefetch_waits_for_more_rather_than_asking(broker: Broker) -> None:
    jq = await opened(broker, 4, prefetch=2, idle=3600)
    try:
        first, second = [await asyncio.wait_for(jq.get(), 30) for _ in range(2)]
        assert first is not None and second is not None
        # at the prefetch an empty buffer only means nothing was acked yet: get() waits
        # for the next delivery (and keeps consuming), which an ack lets in
        waiting = asyncio.create_task(jq.get())
        await asyncio.sleep(0.2)
        assert not waiting.done()
        await jq.ack(first)
        third = await asyncio.wait_for(waiting, 30)
        assert third is not None and third.body == b"range 2"
        await asyncio.gather(jq.ack(second), jq.ack(third))
    finally:
        await jq.close(give_back=False)
        await broker.delete_queue(jq.name)
