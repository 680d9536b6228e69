"""The contract of dispatcher.fastpath, on the real broker: the frame-level path and the
public one publish the same messages with the same guarantees (confirmed, persistent,
mandatory), so that falling back on another aiormq release changes nothing but speed."""

from __future__ import annotations

import asyncio
import contextlib
from importlib.metadata import version
from urllib.parse import urlsplit

import aiormq
import pytest

from dispatcher.config import Settings
from tests.helpers import eventually
from transport import fastpath
from transport.rabbitmq import Broker


def test_the_fast_path_is_on_only_for_the_aiormq_releases_it_was_tested_with() -> None:
    assert fastpath.supported("7.2.4") and fastpath.supported("7.2.0")
    assert not fastpath.supported("7.3.0") and not fastpath.supported("8.0.1")
    assert fastpath.ENABLED == fastpath.supported(version("aiormq"))


@pytest.mark.parametrize("fast", [True, False], ids=["frames", "public"])
async def test_both_paths_publish_every_message_confirmed_persistent_and_named(broker: Broker, fast: bool) -> None:
    name = broker.names.job(1)
    await broker.declare_job_queue(name)
    publisher = await broker.connection.channel(publisher_confirms=True, on_return_raises=True)
    reader = await broker.channel()
    try:
        underlay = await publisher.get_underlay_channel()
        bodies = [f"range {i} ".encode() * (1 + i * 4000) for i in range(20)]  # some span several frames
        await fastpath.publish_many(underlay, ((name, b) for b in bodies), fast=fast)
        queue = await reader.get_queue(name, ensure=False)
        got = []
        while (m := await queue.get(fail=False, no_ack=True)) is not None:
            got.append(m)
        assert [m.body for m in got] == bodies
        assert len({m.message_id for m in got}) == len(bodies)  # each named: a return is matched by it
        assert {m.delivery_mode for m in got} == {2}
        assert {m.content_type for m in got} == {"application/json"}
        # unroutable: raised, never assumed delivered
        with pytest.raises(aiormq.exceptions.PublishError):
            await fastpath.publish_many(underlay, [("no.such.queue", b"x")], fast=fast)
    finally:
        await reader.close()
        await publisher.close()
        await broker.delete_queue(name)


class Cable:
    """A TCP relay to RabbitMQ that can be cut, as a network is: no close, no goodbye."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        for w in self.writers:
            w.transport.abort()
        self.server.close()


@pytest.mark.parametrize("fast", [True, False], ids=["frames", "public"])
async def test_a_connection_lost_before_the_confirms_raises_and_never_hangs(
    settings: Settings, broker: Broker, fast: bool
) -> None:
    name = broker.names.job(1)
    await broker.declare_job_queue(name)
    url = urlsplit(settings.amqp_url)
    cable = Cable((url.hostname or "127.0.0.1", url.port or 5672))
    port = await cable.start()
    connection = await aiormq.connect(url._replace(netloc=f"{url.username}:{url.password}@127.0.0.1:{port}").geturl())
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        bodies = [b"x" * 10_000] * 2_000
        last = channel.delivery_tag + len(bodies)  # type: ignore[attr-defined]
        batch = asyncio.create_task(fastpath.publish_many(channel, ((name, b) for b in bodies), fast=fast))
        # every message of it published (tagged), its confirms still to come: at once, not
        # a poll's interval later
        while channel.delivery_tag < last:  # type: ignore[attr-defined]  # noqa: ASYNC110
            await asyncio.sleep(0)
        cable.cut()  # no confirm will ever come
        outcome = await asyncio.wait_for(asyncio.gather(batch, return_exceptions=True), 30)
        # raised, for the caller to publish again: never assumed sent, never waited on for ever
        assert isinstance(outcome[0], Exception)
    finally:
        with contextlib.suppress(Exception):
            await connection.close()
        await broker.delete_queue(name)


@pytest.mark.parametrize("fast", [True, False], ids=["frames", "public"])
async def test_a_channel_the_broker_closes_before_the_confirms_raises_its_reason(broker: Broker, fast: bool) -> None:
    name = broker.names.job(1)
    await broker.declare_job_queue(name)
    publisher = await broker.connection.channel(publisher_confirms=True, on_return_raises=True)
    try:
        underlay = await publisher.get_underlay_channel()
        bodies = [b"x" * 10_000] * 2_000
        batch = asyncio.create_task(fastpath.publish_many(underlay, ((name, b) for b in bodies), fast=fast))
        await asyncio.sleep(0)  # its frames are queued for the socket
        # an unknown exchange: RabbitMQ closes the channel
        bad = asyncio.create_task(underlay.basic_publish(b"x", exchange="no.such.exchange", routing_key="x"))
        outcomes = await asyncio.wait_for(asyncio.gather(batch, bad, return_exceptions=True), 30)
        assert isinstance(outcomes[1], aiormq.exceptions.ChannelNotFoundEntity)
        # the batch raised that, or every message of it was confirmed before the close
        assert isinstance(outcomes[0], aiormq.exceptions.ChannelNotFoundEntity) or (
            outcomes[0] is None and await broker.queue_depth(name) == len(bodies)
        )
    finally:
        with contextlib.suppress(Exception):
            await publisher.close()
        await broker.delete_queue(name)


@pytest.mark.parametrize("fast", [True, False], ids=["in the reader", "a task each"])
async def test_both_ways_of_taking_deliveries_give_every_message_whole_and_in_order(broker: Broker, fast: bool) -> None:
    name = broker.names.job(1)
    await broker.declare_job_queue(name)
    bodies = [f"range {i} ".encode() * (1 + i * 4000) for i in range(20)]  # some span several frames
    await broker.publish_many((name, b) for b in bodies)
    channel = await broker.connection.channel()
    try:
        underlay = await channel.get_underlay_channel()
        await underlay.basic_qos(prefetch_count=100)
        direct: list[aiormq.abc.DeliveredMessage] = []
        tasks: list[aiormq.abc.DeliveredMessage] = []

        def now(message: aiormq.abc.DeliveredMessage) -> None:
            direct.append(message)
            if len(direct) == 1:
                raise RuntimeError("a consumer's bug")  # logged: the reader goes on

        async def in_a_task(message: aiormq.abc.DeliveredMessage) -> None:
            tasks.append(message)

        assert fastpath.deliver_directly(underlay, "t1", now, fast=fast) == (fast and fastpath.ENABLED)
        await underlay.basic_consume(name, in_a_task, consumer_tag="t1")
        got = direct if fast and fastpath.ENABLED else tasks
        await eventually(lambda: asyncio.sleep(0, len(got) == len(bodies)), what="every delivery")
        assert not (tasks if got is direct else direct)  # one way only
        assert [m.body for m in got] == bodies
        assert [m.delivery.delivery_tag for m in got] == list(range(1, len(bodies) + 1))  # type: ignore[union-attr]
        assert {m.header.properties.delivery_mode for m in got} == {2}
        for m in got:
            await underlay.basic_ack(m.delivery.delivery_tag)  # type: ignore[union-attr, arg-type]
    finally:
        await channel.close()
        await broker.delete_queue(name)
