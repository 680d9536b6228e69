"""The transport's contract, held by both adapters: the same tests run on the real
RabbitMQ and on the in-memory broker, so that what the unit tests learn on the one is
true of the other (prefetch, redelivery on close, delay, dead-lettering, routing)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiormq
import pytest

from tests.conftest import Services
from tests.helpers import eventually
from transport.interface import Incoming, Transport
from transport.memory import MemoryBroker
from transport.names import Names
from transport.rabbitmq import AmqpJobQueue, Broker


@dataclass
class Pair:
    """Two clients of one broker (a control plane and a worker, say)."""

    a: Transport
    b: Transport
    names: Names


@pytest.fixture(params=["memory", "rabbitmq"])
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[Pair]:
    names = Names(prefix=f"t{uuid.uuid4().hex[:8]}.")
    if request.param == "memory":
        memory = MemoryBroker()
        a, b = memory.connect(names), memory.connect(names)
    else:
        services: Services = request.getfixturevalue("services")
        a = await Broker.connect(services.amqp_url, names, client="pytest-a")
        b = await Broker.connect(services.amqp_url, names, client="pytest-b")
    await a.declare_topology()
    try:
        yield Pair(a, b, names)
    finally:
        with contextlib.suppress(Exception):
            for job in range(1, 4):
                await a.delete_queue(names.job(job))
            await a.delete_topology()
        for client in (b, a):  # b may be closed by the test already
            with contextlib.suppress(Exception):
                await client.close()


async def job_queue(t: Transport, n: int) -> str:
    """Job 1's queue holding ``range 0`` .. ``range n-1``."""
    name = t.names.job(1)
    await t.declare_job_queue(name)
    await t.publish_many((name, f"range {i}".encode()) for i in range(n))
    return name


async def test_a_consumer_holds_at_most_its_prefetch_unacked(pair: Pair) -> None:
    queue = pair.names.status  # (the queues consumed so: es.status, es.dead.ranges)
    await pair.a.publish_many((queue, f"range {i}".encode()) for i in range(5))
    got: list[Incoming] = []

    async def handler(message: Incoming) -> None:
        got.append(message)

    stop = await pair.b.consume(queue, handler, prefetch=2)
    await eventually(lambda: asyncio.sleep(0, len(got) == 2), what="two deliveries")
    await asyncio.sleep(0.2)
    assert len(got) == 2  # no third until one is acked
    await got[0].ack()
    await eventually(lambda: asyncio.sleep(0, len(got) == 3), what="the third delivery")
    assert [m.body for m in got] == [b"range 0", b"range 1", b"range 2"]
    assert [m.redelivered for m in got] == [False, False, False]
    assert await pair.a.queue_state(queue) == (2, 1)  # two ready, one consumer
    await stop()


async def test_what_a_closed_connection_held_comes_back_flagged_redelivered(pair: Pair) -> None:
    queue = await job_queue(pair.a, 3)
    jq = await pair.b.open_job(queue, prefetch=3)
    first, second = await jq.get(), await jq.get()
    assert first is not None and second is not None
    assert (first.redelivered, second.redelivered) == (False, False)
    await jq.ack(first)
    await asyncio.sleep(0.2)  # (an ack still in flight when a connection closes may be lost: at least once)
    await pair.b.close()  # as a worker's death closes it
    back = await eventually(lambda: pair.a.queue_depth(queue), what="the unacked ranges back")
    assert back == 2  # the one running and the one never started; not the acked one
    again = [await pair.a.get(queue) for _ in range(2)]
    assert sorted(m.body for m in again if m) == [b"range 1", b"range 2"]
    assert all(m.redelivered for m in again if m)


async def test_a_job_queue_is_full_while_it_holds_its_prefetch_unacked(pair: Pair) -> None:
    # the worker hurries its statuses only then: before, the broker is still sending
    queue = await job_queue(pair.a, 4)
    jq = await pair.b.open_job(queue, prefetch=3)
    first = await jq.get()
    assert first is not None
    await eventually(lambda: asyncio.sleep(0, jq.full), what="three ranges held")
    held = [first, await jq.get(), await jq.get()]
    assert jq.idle and jq.full
    await jq.ack(held[1])  # acked alone (the first is still held): frees one for the fourth
    fourth = await jq.get()
    assert fourth is not None and fourth.body == b"range 3"
    assert jq.full
    for message in (held[0], held[2], fourth):
        assert message is not None
        await jq.ack(message)
    assert not jq.full  # nothing held, nothing left to send
    await jq.close()


async def test_a_job_queue_says_none_once_it_has_nothing_ready(pair: Pair) -> None:
    queue = await job_queue(pair.a, 2)
    jq = await pair.b.open_job(queue, prefetch=1, consume=False)
    assert jq.backlog == 2
    await jq.consume()
    first = await jq.get()
    assert first is not None and first.body == b"range 0"
    await jq.ack(first)  # frees the prefetch: the second comes
    second = await jq.get()
    assert second is not None and second.body == b"range 1"
    assert await jq.get() is None  # while the second is still held: nothing more ready
    await jq.close()  # gives the second back
    back = await eventually(lambda: pair.a.get(queue), what="the range given back")
    assert back.body == b"range 1" and back.redelivered


async def test_a_delivery_after_the_consumers_cancel_is_kept_not_dropped(pair: Pair) -> None:
    # a quorum queue may deliver ranges it had checked out to us after the cancel's
    # answer; aiormq drops a delivery of a consumer it no longer knows, and such a range
    # sat unacked until the channel closed, then came back flagged redelivered and was
    # returned instead of run (hundreds per run at --prefetch 256)
    if not isinstance(pair.b, Broker):
        pytest.skip("the in-memory broker delivers nothing after a cancel")
    queue = await job_queue(pair.a, 1)
    jq = await pair.b.open_job(queue, prefetch=1)
    assert isinstance(jq, AmqpJobQueue)
    tag = jq._tag
    first = await jq.get()
    assert first is not None and tag is not None
    await jq.stop_consuming()
    channel = await jq.channel.get_underlay_channel()
    assert isinstance(channel, aiormq.Channel)
    assert tag in channel.consumers  # what still reaches that consumer lands in the buffer
    await jq.ack(first)
    await jq.close()


async def test_a_cancelled_jobs_delivered_ranges_are_dropped(pair: Pair) -> None:
    queue = await job_queue(pair.a, 3)
    jq = await pair.b.open_job(queue, prefetch=3)
    first = await jq.get()
    assert first is not None
    await jq.ack(first)
    await eventually(lambda: asyncio.sleep(0, not jq.idle), what="the others delivered")
    await jq.close(give_back=False)
    await asyncio.sleep(0.2)
    assert await pair.a.queue_depth(queue) == 0
    assert await pair.a.open_job(queue, consume=False) is not None


async def test_a_missing_job_queue_has_no_backlog(pair: Pair) -> None:
    jq = await pair.b.open_job(pair.names.job(3), consume=False)
    assert jq.backlog is None
    assert await pair.b.queue_state(pair.names.job(3)) is None
    await jq.close()


async def test_a_delayed_message_arrives_after_its_step(pair: Pair) -> None:
    queue = await job_queue(pair.a, 0)
    await pair.a.publish_delayed(queue, b"later", 0.5)  # the 500 ms step
    assert await pair.a.queue_depth(queue) == 0
    assert await pair.a.queue_depth(pair.names.retry(500)) == 1
    message = await eventually(lambda: pair.a.get(queue), timeout=5, what="the delayed message")
    assert message.body == b"later"
    assert await pair.a.queue_depth(pair.names.retry(500)) == 0


async def test_a_rejected_range_is_dead_lettered_with_its_queue(pair: Pair) -> None:
    queue = await job_queue(pair.a, 1)
    message = await pair.b.get(queue)
    assert message is not None
    await message.nack(requeue=False)
    dead = await eventually(lambda: pair.a.get(pair.names.dead_ranges), what="the dead range")
    assert dead.body == b"range 0"
    assert dead.headers["x-death"][0]["queue"] == queue


async def test_a_message_no_queue_takes_raises(pair: Pair) -> None:
    with pytest.raises(Exception, match=r"(?i)rout|no queue|NO_ROUTE|312"):
        await pair.a.publish(pair.names.job(2), b"nowhere")


async def test_statuses_go_through_the_status_exchange(pair: Pair) -> None:
    await pair.b.publish_status(b"status")
    message = await eventually(lambda: pair.a.get(pair.names.status), what="the status")
    assert message.body == b"status"
    await message.ack()
    assert await pair.a.queue_depth(pair.names.status) == 0


async def test_a_broadcast_reaches_every_listener(pair: Pair) -> None:
    heard: dict[str, list[bytes]] = {"a": [], "b": []}
    for name, client in (("a", pair.a), ("b", pair.b)):

        async def listen(message: Incoming, name: str = name) -> None:
            heard[name].append(message.body)

        await client.listen_control(listen)
    await pair.a.broadcast(b"cancel")
    await eventually(lambda: asyncio.sleep(0, heard == {"a": [b"cancel"], "b": [b"cancel"]}), what="both heard")


async def test_announcements_are_taken_one_at_a_time(pair: Pair) -> None:
    await pair.a.publish_many([(pair.names.jobs, b"job 1"), (pair.names.jobs, b"job 2")])
    announcements = await pair.b.announcements()
    first = await announcements.next()
    assert first.body == b"job 1"
    await asyncio.sleep(0.1)
    assert await pair.a.queue_depth(pair.names.jobs) == 1  # the second waits for another worker
    await first.ack()
    second = await announcements.next()
    assert second.body == b"job 2"
    await pair.b.close()  # unacked: back for the next worker
    again = await eventually(lambda: pair.a.get(pair.names.jobs), what="the announcement back")
    assert again.body == b"job 2" and again.redelivered


async def test_a_purge_drops_only_what_is_ready(pair: Pair) -> None:
    queue = await job_queue(pair.a, 3)
    jq = await pair.b.open_job(queue, prefetch=1)
    held = await jq.get()
    assert held is not None
    await pair.a.purge_queue(queue)
    assert await pair.a.queue_depth(queue) == 0
    await jq.close()  # the one held comes back: it was delivered, not ready
    assert (await eventually(lambda: pair.a.get(queue), what="the held range")).body == held.body


async def test_topology_is_checked_and_deleted(pair: Pair) -> None:
    await pair.b.check_topology()
    await pair.a.delete_topology()
    with pytest.raises(Exception):  # noqa: B017 - each adapter says "not found" its own way
        await pair.b.check_topology()
    await pair.a.declare_topology()
