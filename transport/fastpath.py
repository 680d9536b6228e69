"""Publishing many messages in one socket write, and taking deliveries without a task
each: the one module that reaches into aiormq.

A job's ranges are published together. Through aiormq's public ``basic_publish`` each
message costs a lock, a timeout, a task and a socket write, and at ranges of one event
that was most of the control plane's work (about 43 µs of client CPU per message more,
measured side by side). Here the frames ``basic_publish`` would write are written at once,
and each confirm is registered in the channel's own tables, so that aiormq's reader
settles it (a nack raises ``DeliveryError``, a returned message ``PublishError``); one
future per batch in the channel's store is rejected if the channel closes.

Those tables are aiormq's private state: this is written against the aiormq minor
releases in ``TESTED`` and checked at import. With any other release, or if the
attributes are missing, ``publish_many`` takes the public path (slower, same results).
A consumer's deliveries (``deliver_directly``) are handed to a plain function in the
channel's reader as they are read. aiormq runs each consumer callback as a task of its
own, wrapped and registered in two future stores with a done callback each: at ranges of
one event that was a tenth of a worker's time.

tests/test_fastpath.py holds the contract: both paths, against the real broker.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import Callable, Iterable
from functools import partial
from importlib.metadata import version
from typing import Any

import aiormq
from aiormq import spec
from aiormq.abc import ChannelFrame, DeliveredMessage
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

log = logging.getLogger(__name__)

TESTED = ("7.2",)  # aiormq minor releases the frame-level path was written and tested against
_STATE = ("delivery_tag", "confirmations", "message_id_delivery_tag", "write_queue", "lock", "max_content_size")
_READING = ("consumers", "_on_deliver_frame", "_read_content", "_Channel__get_content_header")
_DIRECT = "_es_direct_consumers"  # a channel's consumers served in its reader: tag -> function


def supported(aiormq_version: str) -> bool:
    return ".".join(aiormq_version.split(".")[:2]) in TESTED


ENABLED = supported(version("aiormq"))
if not ENABLED:  # pragma: no cover - depends on the installed release
    log.warning("aiormq %s is not one the fast publish path was tested with: using the public path", version("aiormq"))

_ids = itertools.count()
_prefix = uuid.uuid4().hex[:8]  # message ids unique per process (a uuid4 each was a getrandom(2) each)


def properties(headers: dict[str, Any] | None = None, message_id: str | None = None) -> spec.Basic.Properties:
    """Every message we publish: JSON, persistent."""
    return spec.Basic.Properties(
        content_type="application/json", delivery_mode=2, headers=headers or {}, message_id=message_id
    )


async def publish_many(
    channel: aiormq.abc.AbstractChannel, items: Iterable[tuple[str, bytes]], *, fast: bool = ENABLED
) -> None:
    """Publish persistently to queues (through the default exchange), mandatory, and wait
    for every confirm. ``fast=False`` takes the public path (the contract test runs both)."""
    items = list(items)
    if not items:
        return
    if not fast or not isinstance(channel, aiormq.Channel) or not _has(channel, _STATE):
        await asyncio.gather(
            *(
                channel.basic_publish(
                    body, exchange="", routing_key=key, properties=properties(message_id=_message_id()), mandatory=True
                )
                for key, body in items
            )
        )
        return
    frames: list[Any] = []
    confirms: list[asyncio.Future[Any]] = []
    loop = asyncio.get_running_loop()
    # the batch's one future in the channel's own store, which rejects it if the channel
    # closes; the confirms are plain futures (one in that store each cost a set entry and
    # a done callback in the channel's store and its connection's: 12 % of the control
    # plane's samples at range 1)
    closed = channel.create_future()
    async with channel.lock:  # delivery tags are counted in publishing order
        for routing_key, body in items:
            channel.delivery_tag += 1
            tag = channel.delivery_tag
            message_id = _message_id()  # how a returned (unroutable) message is matched
            confirm = loop.create_future()
            channel.confirmations[tag] = confirm
            channel.message_id_delivery_tag[message_id] = tag
            confirm.add_done_callback(partial(_forget_message_id, channel, message_id, tag))
            confirms.append(confirm)
            frames.append(spec.Basic.Publish(exchange="", routing_key=routing_key, mandatory=True))
            frames.append(ContentHeader(properties=properties(message_id=message_id), body_size=len(body)))
            step = channel.max_content_size
            frames.extend(ContentBody(body[i : i + step]) for i in range(0, len(body), step))
        await channel.write_queue.put(ChannelFrame.marshall(frames=frames, channel_number=channel.number))
    confirmed = asyncio.gather(*confirms)
    try:
        await asyncio.wait((confirmed, closed), return_when=asyncio.FIRST_COMPLETED)
        if not confirmed.done():  # the channel closed first: its reason, if it gave one
            reason = None if closed.cancelled() else closed.exception()
            raise reason or aiormq.exceptions.ChannelInvalidStateError("channel closed before its confirms")
        confirmed.result()  # a nack (DeliveryError) or a return (PublishError) raises
    finally:
        closed.cancel()
        if not confirmed.done():
            confirmed.cancel()  # it ends with the CancelledError as its exception: read it
            confirmed.add_done_callback(lambda f: f.cancelled() or f.exception())


def _message_id() -> str:
    return f"{_prefix}{next(_ids)}"


def _has(channel: aiormq.Channel, names: tuple[str, ...]) -> bool:
    """The channel has the private state a fast path uses (it may differ in a release)."""
    return all(hasattr(channel, a) for a in names)


def _forget_message_id(channel: aiormq.Channel, message_id: str, tag: int, _: object) -> None:
    if channel.message_id_delivery_tag.get(message_id) == tag:
        del channel.message_id_delivery_tag[message_id]


def deliver_directly(
    channel: aiormq.abc.AbstractChannel,
    consumer_tag: str,
    deliver: Callable[[DeliveredMessage], None],
    *,
    fast: bool = ENABLED,
) -> bool:
    """Hand the deliveries of ``consumer_tag`` on ``channel`` to ``deliver`` in the
    channel's reader, as each is read, instead of in a task each. Register it before the
    basic.consume (whose callback stays the way for any other consumer of the channel).
    ``deliver`` must not block; what it raises is logged. False, and nothing changed,
    where the fast path is off: the consumer's callback then gets every delivery."""
    if not fast or not isinstance(channel, aiormq.Channel) or not _has(channel, _READING):
        return False
    direct: dict[str, Callable[[DeliveredMessage], None]] | None = getattr(channel, _DIRECT, None)
    if direct is None:
        direct = {}
        setattr(channel, _DIRECT, direct)
        channel._on_deliver_frame = partial(_on_deliver_frame, channel, direct, channel._on_deliver_frame)  # type: ignore[method-assign]
    direct[consumer_tag] = deliver
    return True


async def _on_deliver_frame(
    channel: aiormq.Channel,
    direct: dict[str, Callable[[DeliveredMessage], None]],
    through_a_task: Callable[[spec.Basic.Deliver], Any],
    frame: spec.Basic.Deliver,
) -> None:
    deliver = direct.get(frame.consumer_tag or "")
    if deliver is None or frame.consumer_tag not in channel.consumers:
        # aiormq's own way (it reads the message, and drops it if nobody consumes it)
        await through_a_task(frame)
        return
    header = await channel._Channel__get_content_header()  # type: ignore[attr-defined]
    message = await channel._read_content(frame, header)
    try:
        deliver(message)
    except Exception:  # the channel's reader must go on
        log.exception("a delivery's consumer failed", extra={"consumer_tag": frame.consumer_tag})
