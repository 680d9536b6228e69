"""Publishing many messages at once (Broker.publish_many) against the real RabbitMQ."""

from __future__ import annotations

import asyncio

import aiormq
import pytest

from dispatcher.config import Settings
from tests.helpers import eventually
from transport.interface import Incoming
from transport.rabbitmq import Broker


async def drain(broker: Broker, name: str) -> list[tuple[bytes, int | None, str | None]]:
    """Every message of a queue: body, delivery mode, content type."""
    ch = await broker.channel()
    queue = await ch.get_queue(name, ensure=False)
    got = []
    while (m := await queue.get(fail=False, no_ack=True)) is not None:
        got.append((m.body, m.delivery_mode, m.content_type))
    await ch.close()
    return got


async def test_many_messages_arrive_whole_persistent_and_in_order(broker: Broker) -> None:
    name = broker.names.job(1)
    await broker.declare_job_queue(name)
    underlay = await (await broker.channel()).get_underlay_channel()
    assert isinstance(underlay, aiormq.Channel)
    big = b"x" * (3 * underlay.max_content_size + 5)  # more than one body frame
    bodies = [f"range {i}".encode() for i in range(200)] + [big, b""]
    await broker.publish_many((name, body) for body in bodies)
    got = await drain(broker, name)
    assert [body for body, _, _ in got] == bodies
    assert {(mode, kind) for _, mode, kind in got} == {(2, "application/json")}
    # the channel's tables of pending confirms hold nothing of ours any more
    assert not underlay.confirmations and not underlay.message_id_delivery_tag
    await broker.delete_queue(name)


async def test_an_unroutable_message_among_many_raises_and_the_channel_goes_on(broker: Broker) -> None:
    name = broker.names.job(1)
    await broker.declare_job_queue(name)
    with pytest.raises(aiormq.exceptions.PublishError):
        await broker.publish_many([(name, b"first"), (broker.names.job(2), b"nowhere"), (name, b"third")])
    await broker.publish_many([(name, b"after")])
    await broker.publish(name, b"alone")
    assert [body for body, _, _ in await drain(broker, name)] == [b"first", b"third", b"after", b"alone"]
    await broker.delete_queue(name)


async def test_ack_all_acks_what_the_bookkeeper_committed_and_nothing_after(broker: Broker) -> None:
    """The bookkeeper commits its oldest messages first: one multiple ack up to the last
    of them acks exactly those; after the channel closes RabbitMQ delivers the rest again."""
    name = broker.names.job(1)
    await broker.declare_job_queue(name)
    await broker.publish_many((name, f"status {i}".encode()) for i in range(10))
    ch = await broker.channel()
    queue = await ch.get_queue(name, ensure=False)
    got = [await queue.get(no_ack=False) for _ in range(10)]
    await broker.ack_all(reversed(got[:7]))  # in any order
    await ch.close()
    # (a quorum queue puts returned messages back in an order of its own)
    assert sorted(body for body, _, _ in await drain(broker, name)) == [f"status {i}".encode() for i in range(7, 10)]
    await broker.delete_queue(name)


async def test_ack_all_skips_a_closed_channel(broker: Broker) -> None:
    name = broker.names.job(1)
    await broker.declare_job_queue(name)
    await broker.publish_many((name, f"status {i}".encode()) for i in range(2))
    old = await broker.channel()
    lost = await (await old.get_queue(name, ensure=False)).get(no_ack=False)
    await old.close()
    ch = await broker.channel()
    kept = await (await ch.get_queue(name, ensure=False)).get(no_ack=False)
    await broker.ack_all([lost, kept])  # the closed channel's is left to come back
    await ch.close()
    assert len(await drain(broker, name)) == 1
    await broker.delete_queue(name)


async def test_a_list_of_urls_is_tried_in_turn(settings: Settings) -> None:
    # nothing listens on port 1: the first node is down, the second answers
    urls = f"amqp://guest:guest@127.0.0.1:1/,{settings.amqp_url}"
    broker = await Broker.connect(urls, settings.names, client="pytest-urls")
    try:
        await broker.declare_topology()
        await broker.publish(settings.names.jobs, b"hello")
        assert await broker.queue_depth(settings.names.jobs) == 1
        assert (await broker.channel()) is not None  # the plain connection found it too
    finally:
        await broker.delete_topology()
        await broker.close()


async def test_a_list_of_urls_that_all_refuse_raises(settings: Settings) -> None:
    with pytest.raises(OSError):
        await Broker.connect("amqp://guest:guest@127.0.0.1:1/, amqp://guest:guest@127.0.0.1:2/", settings.names)


async def test_quorum_and_classic_queues_are_declared_as_asked_and_a_classic_one_is_kept(settings: Settings) -> None:
    # a deployment from before quorum queues were the default keeps its classic queues
    classic = await Broker.connect(settings.amqp_url, settings.names, client="pytest-classic", queue_type="classic")
    await classic.declare_topology()
    quorum = await Broker.connect(settings.amqp_url, settings.names, client="pytest-quorum")
    try:
        await quorum.declare_topology()  # finds them classic: used as they are, not an error
        await quorum.publish(settings.names.status, b"status")
        assert await quorum.queue_depth(settings.names.status) == 1
        got: list[bytes] = []

        async def handler(message: Incoming) -> None:
            got.append(message.body)
            await message.ack()

        stop = await quorum.consume(settings.names.status, handler, prefetch=1)
        await eventually(lambda: asyncio.sleep(0, got == [b"status"]), what="the status consumed")
        await stop()
        # a job queue declared quorum takes x-queue-type: a classic declaration of it now clashes
        await quorum.declare_job_queue(settings.names.job(1))
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
            await (await classic.channel()).declare_queue(settings.names.job(1), durable=True)
        with pytest.raises(ValueError, match="queue type"):
            await Broker.connect(settings.amqp_url, settings.names, queue_type="mirrored")
    finally:
        await quorum.delete_queue(settings.names.job(1))
        await quorum.delete_topology()
        await quorum.close()
        await classic.close()
