"""Status reports: collected, batched into one message, confirmed by RabbitMQ.

``report`` returns a future that resolves once the batch holding the updates is
confirmed in es.status; a range is acked only then, so its statuses are safe before
RabbitMQ forgets it. A slot does not wait for that, so updates linger a few
milliseconds to share one message (one status message per range would cost RabbitMQ,
the bookkeeper and Postgres a round each); a batch leaves early when it is full, or when a
slot has nothing to run until a range is acked (``hurry``: a consumer gets a new range
only for an acked one), and the next one gathers while it is being confirmed. A 'running' update overtaken by its
final one before it leaves is folded into it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable

from schemas.messages import Heartbeat, JobLog, Refused, StatusBatch, StatusUpdate, encode
from transport.interface import Transport
from transport.outage import is_outage

log = logging.getLogger(__name__)


class StatusReporter:
    def __init__(self, broker: Transport, worker: str, *, max_batch: int = 1000, linger: float = 0.01) -> None:
        self.broker = broker
        self.worker = worker
        self.max_batch = max_batch
        self.linger = linger
        self._updates: dict[tuple[int, int, int], StatusUpdate] = {}
        self._logs: list[JobLog] = []
        self._refused: list[Refused] = []
        self._invite: set[int] = set()
        self._heartbeat: Heartbeat | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._has_work = asyncio.Event()
        self._urgent = asyncio.Event()
        # called before each batch is published: what the batch reports must be on disk
        # first (the job logs), so that a worker killed after sending has lost nothing
        self.before_publish: Callable[[], None] | None = None

    def _add(self, updates: Iterable[StatusUpdate]) -> None:
        for u in updates:
            key = (u.job_id, u.number, u.attempt)
            old = self._updates.get(key)
            if old is not None and old.status != "running" and u.status == "running":
                continue  # a final update is never taken back by a late 'running'
            if old is not None and u.started_at is None:
                u = u.model_copy(update={"started_at": old.started_at})
            self._updates[key] = u
        self._has_work.set()
        if len(self._updates) >= self.max_batch:
            self._urgent.set()

    def running(self, update: StatusUpdate) -> None:
        self._add([update])

    def heartbeat(self, beat: Heartbeat) -> None:
        """Sent with the next batch (only the latest one matters)."""
        self._heartbeat = beat
        self._has_work.set()

    def invite(self, job_id: int) -> None:
        """Ask the control plane to announce ``job_id`` again, so that idle workers join."""
        self._invite.add(job_id)
        self._has_work.set()

    def report(
        self, updates: Iterable[StatusUpdate] = (), logs: Iterable[JobLog] = (), refused: Iterable[Refused] = ()
    ) -> asyncio.Future[None]:
        """Queue updates, logs and refused messages; the future resolves once RabbitMQ has
        confirmed them."""
        self._logs.extend(logs)
        self._refused.extend(refused)
        self._add(updates)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(done)
        self._has_work.set()
        return done

    def hurry(self) -> None:
        """Send what waits for a confirm now, or what is reported next if nothing does
        yet: a slot is idle until a range is acked, and the ranges it ran may still be on
        their way here (a worker reports them in the background)."""
        self._urgent.set()

    async def run(self) -> None:
        try:
            while True:
                await self._has_work.wait()
                if not self._urgent.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.linger):
                            await self._urgent.wait()
                await self.flush()
        finally:
            # nobody will confirm them now: whoever waits must not wait for ever (a range
            # left unacked goes back to its queue with the connection)
            for w in self._waiters:
                if not w.done():
                    w.cancel()

    async def flush(self) -> None:
        updates, self._updates = list(self._updates.values()), {}
        logs, self._logs = self._logs, []
        refused, self._refused = self._refused, []
        invite, self._invite = sorted(self._invite), set()
        beat, self._heartbeat = self._heartbeat, None
        waiters, self._waiters = self._waiters, []
        self._has_work.clear()
        self._urgent.clear()
        if self.before_publish is not None:
            self.before_publish()
        if updates or logs or refused or invite or beat is not None:
            batch = StatusBatch(
                worker=self.worker, updates=updates, logs=logs, heartbeat=beat, refused=refused, invite=invite
            )
            await self._publish(encode(batch))
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def _publish(self, body: bytes) -> None:
        delay = 0.2
        while True:
            try:
                await self.broker.publish_status(body)
                return
            except Exception as exc:
                if not is_outage(exc):
                    raise
                # never dropped: the robust connection comes back and we send again
                log.warning("status publish failed; retrying", extra={"error": str(exc), "retry_in": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
