"""Bookkeeper: status messages from workers -> Postgres, in batches.

Messages are acked only after the transaction that applied them committed, so a crash
or a database outage loses nothing: unacked messages are redelivered and re-applied,
which is harmless because applying is idempotent (see ``apply_updates`` in the SQL).

Two loops: one applies transactions back to back; the other, behind it, checks whether
the jobs they ended are finished and then acks their messages (so a crash before that
check redelivers them, and the check is made again). The check and the acks once took a
sixth of the bookkeeping's time; now the next transaction does not wait for them.

What a transaction decides is published before its messages are acked: next attempts,
events returned to their jobs, dead letters (``Reissuer``), and the messages it refused
(statuses for unknown events or attempts never issued, and what workers refused).

One message never stops the bookkeeping: a batch the database refuses for a reason that
is not an outage (a value no column can hold, say) is applied again message by message,
and the one message it still refuses goes to es.dlq with the database's reason.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections import deque
from functools import partial

import asyncpg

from dispatcher.finisher import Finisher
from dispatcher.reissue import Reissuer
from dispatcher.store import Applied, Due, Store
from schemas.messages import StatusBatch
from schemas.text import storable
from transport.interface import REFUSED_BY_HEADER, Incoming, Transport
from transport.outage import is_outage, patiently

Taken = list[tuple[Incoming, StatusBatch]]


def _weight(batch: StatusBatch) -> int:
    """What a decoded batch holds, in updates (a refused message's body counts by size)."""
    return len(batch.updates) + len(batch.logs) + sum(len(r.body) for r in batch.refused) // 1000

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
        broker: Transport,
        finisher: Finisher,
        reissuer: Reissuer,
        *,
        batch_size: int,
        linger: float,
        parallel: int = 2,
    ) -> None:
        self.store = store
        self.parallel = parallel  # transactions side by side (each for its share of the jobs)
        self.broker = broker
        self.finisher = finisher
        self.reissuer = reissuer
        self.batch_size = batch_size
        self.linger = linger
        # in arrival order; a batch of None is a message not decoded yet
        self._pending: deque[tuple[Incoming, StatusBatch | None]] = deque()
        self._count = 0  # updates and logs held decoded
        self._has_work = asyncio.Event()
        self._full = asyncio.Event()
        # committed transactions: the jobs they ended, and their messages to ack after the check
        self._committed: list[tuple[set[int], list[Incoming]]] = []
        self._has_committed = asyncio.Event()
        self.applied = 0  # updates applied since start (for tests and metrics)

    @property
    def held(self) -> int:
        """Status messages taken from es.status and not yet applied (for tests and metrics)."""
        return len(self._pending)

    @property
    def held_decoded(self) -> int:
        """... of which decoded (at most about a transaction's worth)."""
        return sum(1 for _, batch in self._pending if batch is not None)

    async def start(self) -> None:
        self._stop = await self.broker.consume(self.broker.names.status, self._on_message, prefetch=self.PREFETCH)

    async def stop(self) -> None:
        await self._stop()

    async def _on_message(self, message: Incoming) -> None:
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

    async def _decode(self, message: Incoming) -> StatusBatch | None:
        batch = await patiently(
            partial(self.broker.decode_or_dead_letter, message, StatusBatch, source=self.broker.names.status),
            what="dead-lettering a status message",
        )
        if batch is not None:
            self._count += _weight(batch)
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

    async def _take(self) -> list[tuple[Incoming, StatusBatch]]:
        """Messages for one transaction: about ``batch_size`` updates, oldest first."""
        taken: list[tuple[Incoming, StatusBatch]] = []
        size = 0
        while self._pending and size < self.batch_size:
            message, batch = self._pending.popleft()
            if batch is None:
                batch = await self._decode(message)
                if batch is None:
                    continue
            n = _weight(batch)
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
        try:
            applied = await self._apply_shares(taken)
        except asyncpg.PostgresError as exc:  # not an outage: those are waited out
            log.error(
                "the database refused a batch: applying its messages one by one",
                extra={"messages": len(taken), "error": storable(str(exc), 300)},
            )
            applied = await self._apply_alone(taken)
        moved = set().union(*(a.moved for a in applied))
        refused = {(r.job_id, r.number, r.attempt): r for a in applied for r in a.refused}
        if refused:  # statuses for no known event, or for an attempt never issued
            for message, batch in taken:
                bad = [refused[k] for u in batch.updates if (k := (u.job_id, u.number, u.attempt)) in refused]
                if bad:  # the rest of the message was applied
                    await self._dead_letter(message.body, bad[0].reason())
        due = [d for a in applied for d in a.due]
        due += await self._forward_refused(taken)
        if due:
            await patiently(partial(self.reissuer.publish, due), what="issuing attempts")
        invited = sorted({job for _, b in taken for job in b.invite})
        if invited:
            await patiently(partial(self.reissuer.releaser.invite, invited), what="announcing")
        self.applied += len(updates)
        # not only the jobs this batch moved: a duplicate may be all that is left of a
        # batch whose finish check was lost in a crash
        ended = {u.job_id for u in updates if u.status in ("finished", "failed", "fatal", "returned", "stopped")}
        self._committed.append((ended, [message for message, _ in taken]))
        self._has_committed.set()
        return moved

    async def _apply_shares(self, taken: Taken) -> list[Applied]:
        """The batch in ``parallel`` transactions side by side, one per share of the jobs:
        they never lock the same events, and Postgres applies them on as many cores (one
        transaction at a time fell seconds behind two workers at ranges of 10). Unacked
        until all committed: a database outage only makes us wait."""
        updates = [u for _, b in taken for u in b.updates]
        logs = [lg for _, b in taken for lg in b.logs]
        beats = [(b.worker, b.heartbeat) for _, b in taken if b.heartbeat is not None]
        n = self.parallel
        shares = [
            (
                [u for u in updates if u.job_id % n == i],
                [lg for lg in logs if lg.job_id % n == i],
                beats if i == 0 else [],
            )
            for i in range(n)
        ]
        return list(
            await asyncio.gather(
                *(
                    patiently(partial(self.store.apply_batch, *share), what="bookkeeping")
                    for share in shares
                    if any(share)
                )
            )
        )

    async def _apply_alone(self, taken: Taken) -> list[Applied]:
        """Each message in transactions of its own; a message the database still refuses
        is applied update by update, and goes to es.dlq with the database's reason (its
        other updates applied: their ranges are acked already)."""
        applied = []
        for message, batch in taken:
            try:
                applied += await self._apply_shares([(message, batch)])
                continue
            except asyncpg.PostgresError as exc:
                reason = f"the database refused this status message: {type(exc).__name__}: {exc}"
            parts: list[StatusBatch] = [batch.model_copy(update={"updates": [u]}) for u in batch.updates]
            parts.append(batch.model_copy(update={"updates": []}))  # its logs and heartbeat
            for part in parts:
                with contextlib.suppress(asyncpg.PostgresError):
                    applied += await self._apply_shares([(message, part)])
            await self._dead_letter(message.body, reason)
        return applied

    async def _dead_letter(self, body: bytes, reason: str) -> None:
        await patiently(
            partial(self.broker.dead_letter, body, reason, source=self.broker.names.status), what="dead-lettering"
        )

    async def _forward_refused(self, taken: Taken) -> list[Due]:
        """Messages workers refused go to es.dlq (a worker may not publish there). A job
        whose set-up failed is counted: returns the dead letters of a job that failed to
        set up on as many workers as its task has attempts."""
        due: list[Due] = []
        for _, batch in taken:
            for r in batch.refused:
                try:
                    body = base64.b64decode(r.body, validate=True)
                except ValueError:
                    body = r.body.encode()
                headers = {
                    "x-reason": storable(r.reason, 1000),
                    "x-source-queue": r.source,
                    REFUSED_BY_HEADER: batch.worker,
                }
                await patiently(
                    partial(self.broker.publish, self.broker.names.dlq, body, headers=headers), what="dead-lettering"
                )
                if r.setup_failed is not None:
                    reason = storable(f"the job's set-up failed on its workers; last: {r.reason}", 2000)
                    due += await patiently(partial(self.store.setup_failed, r.setup_failed, reason), what="set-up")
        return due

    async def settle(self) -> None:
        """Check the jobs that committed transactions ended (all of them at once), then
        ack their messages."""
        committed, self._committed = self._committed, []
        self._has_committed.clear()
        if not committed:
            return
        ended = set().union(*(jobs for jobs, _ in committed))
        await patiently(lambda: self.finisher.check(ended), what="finishing")
        try:
            await self.broker.ack_all(message for _, messages in committed for message in messages)
        except Exception as exc:
            # a channel lost since: RabbitMQ delivers the messages again, and applying
            # them again changes nothing
            if not is_outage(exc):
                raise
