"""Bookkeeper: status messages from workers -> Postgres, in batches.

Messages are acked only after the transaction that applied them committed, so a crash
or a database outage loses nothing: unacked messages are redelivered and re-applied,
which is harmless because applying is idempotent (see ``apply_updates`` in the SQL).

Two loops: one applies transactions back to back; the other, behind it, checks whether
the jobs they ended are finished and then acks their messages (so a crash before that
check redelivers them, and the check is made again). The check and the acks once took a
sixth of the bookkeeping's time; now the next transaction does not wait for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from functools import partial

from aio_pika.abc import AbstractIncomingMessage

from dispatcher.broker import Broker
from dispatcher.finisher import Finisher
from dispatcher.retry import TRANSIENT, patiently
from dispatcher.store import Store
from schemas.messages import StatusBatch

log = logging.getLogger(__name__)


class Bookkeeper:
    """Memory is bounded by updates, not messages: a status message holds one update or
    a thousand. Up to ``batch_size`` updates are held decoded (about a kilobyte each); the
    messages beyond them wait as their bodies (a fifth of that) and are decoded when a
    transaction takes them. A deep prefetch keeps small messages flowing in while a
    transaction runs (32 instead of 256 cost a third of the throughput at ranges of 1)."""

    PREFETCH = 256

    def __init__(
        self,
        store: Store,
        broker: Broker,
        finisher: Finisher,
        *,
        batch_size: int,
        linger: float,
        parallel: int = 2,
    ) -> None:
        self.store = store
        self.parallel = parallel  # transactions side by side (each for its share of the jobs)
        self.broker = broker
        self.finisher = finisher
        self.batch_size = batch_size
        self.linger = linger
        # in arrival order; a batch of None is a message not decoded yet
        self._pending: deque[tuple[AbstractIncomingMessage, StatusBatch | None]] = deque()
        self._count = 0  # updates and logs held decoded
        self._has_work = asyncio.Event()
        self._full = asyncio.Event()
        # committed transactions: the jobs they ended, and their messages to ack after the check
        self._committed: list[tuple[set[int], list[AbstractIncomingMessage]]] = []
        self._has_committed = asyncio.Event()
        self.applied = 0  # updates applied since start (for tests and metrics)

    async def start(self) -> None:
        self._stop = await self.broker.consume(self.broker.names.status, self._on_message, prefetch=self.PREFETCH)

    async def stop(self) -> None:
        await self._stop()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if self._count >= self.batch_size:
            self._pending.append((message, None))  # a transaction's worth is decoded already
            return
        batch = await self._decode(message)
        if batch is None:
            return
        self._pending.append((message, batch))
        self._has_work.set()
        if self._count >= self.batch_size:
            self._full.set()

    async def _decode(self, message: AbstractIncomingMessage) -> StatusBatch | None:
        batch = await self.broker.decode_or_dead_letter(message, StatusBatch, source=self.broker.names.status)
        if batch is not None:
            self._count += len(batch.updates) + len(batch.logs)
        return batch

    async def run(self) -> None:
        settler = asyncio.create_task(self._settle_committed())
        try:
            while True:
                await self._has_work.wait()
                if self._count < self.batch_size:
                    # give the batch a moment to fill: one transaction for many messages
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.linger):
                            await self._full.wait()
                await self.apply()
                if settler.done():  # it failed: let the control plane see it
                    await settler
        finally:
            settler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await settler

    async def _settle_committed(self) -> None:
        while True:
            await self._has_committed.wait()
            await self.settle()

    async def _take(self) -> list[tuple[AbstractIncomingMessage, StatusBatch]]:
        """Messages for one transaction: about ``batch_size`` updates, oldest first."""
        taken: list[tuple[AbstractIncomingMessage, StatusBatch]] = []
        size = 0
        while self._pending and size < self.batch_size:
            message, batch = self._pending.popleft()
            if batch is None:
                batch = await self._decode(message)
                if batch is None:
                    continue
            n = len(batch.updates) + len(batch.logs)
            self._count -= n
            size += n
            taken.append((message, batch))
        self._full.clear()
        if self._pending:
            self._has_work.set()  # more waits: the next transaction starts right away
            if self._count >= self.batch_size:
                self._full.set()
        else:
            self._has_work.clear()
        return taken

    async def flush(self) -> set[int]:
        """Apply what is held and settle it: finished jobs found, messages acked."""
        moved = await self.apply()
        await self.settle()
        return moved

    async def apply(self) -> set[int]:
        """One transaction of held updates; returns the jobs it moved. Its messages are
        acked by ``settle``."""
        taken = await self._take()
        if not taken:
            return set()
        updates = [u for _, b in taken for u in b.updates]
        logs = [lg for _, b in taken for lg in b.logs]
        beats = [(b.worker, b.heartbeat) for _, b in taken if b.heartbeat is not None]
        # Side by side, one transaction per share of the jobs: they never lock the same
        # events, and Postgres applies them on as many cores (one transaction at a time
        # fell seconds behind two workers at ranges of 10). Unacked until all committed:
        # a database outage only makes us wait.
        n = self.parallel
        shares = [
            (
                [u for u in updates if u.job_id % n == i],
                [lg for lg in logs if lg.job_id % n == i],
                beats if i == 0 else [],
            )
            for i in range(n)
        ]
        applied = await asyncio.gather(
            *(
                patiently(partial(self.store.apply_batch, *share), what="bookkeeping")
                for share in shares
                if any(share)
            )
        )
        moved = set().union(*(a.moved for a in applied))
        unknown = set().union(*(a.unknown for a in applied))
        for message, batch in taken:
            bad = [u for u in batch.updates if (u.job_id, u.number) in unknown]
            if bad:  # poison: an update for no event we know; the rest of it was applied
                reason = f"status for unknown event(s): job {bad[0].job_id} event {bad[0].number}"
                await self.broker.dead_letter(message.body, reason, source=self.broker.names.status)
        self.applied += len(updates)
        # not only the jobs this batch moved: a duplicate may be all that is left of a
        # batch whose finish check was lost in a crash
        ended = {u.job_id for u in updates if u.status in ("finished", "failed")}
        self._committed.append((ended, [message for message, _ in taken]))
        self._has_committed.set()
        return moved

    async def settle(self) -> None:
        """Check the jobs that committed transactions ended (all of them at once), then
        ack their messages."""
        committed, self._committed = self._committed, []
        self._has_committed.clear()
        if not committed:
            return
        ended = set().union(*(jobs for jobs, _ in committed))
        await patiently(lambda: self.finisher.check(ended), what="finishing")
        with contextlib.suppress(*TRANSIENT, RuntimeError):
            # a channel lost since: RabbitMQ delivers the messages again, and applying
            # them again changes nothing
            await self.broker.ack_all(message for _, messages in committed for message in messages)
