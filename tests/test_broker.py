"""Publishing many messages at once (Broker.publish_many) against the real RabbitMQ."""

from __future__ import annotations

import aiormq
import pytest

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
    assert [body for body, _, _ in await drain(broker, name)] == [f"status {i}".encode() for i in range(7, 10)]
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
