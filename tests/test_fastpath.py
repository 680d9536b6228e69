"""The contract of dispatcher.fastpath, on the real broker: the frame-level path and the
public one publish the same messages with the same guarantees (confirmed, persistent,
mandatory), so that falling back on another aiormq release changes nothing but speed."""

from __future__ import annotations

from importlib.metadata import version

import aiormq
import pytest

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
