"""The control plane (``dispatcher start``): releaser, bookkeeper and finisher in one
asyncio process, wired together here. Several copies may run side by side."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable

import asyncpg

from dispatcher.bookkeeper import Bookkeeper
from dispatcher.config import Settings
from dispatcher.finisher import Finisher
from dispatcher.leader import Leadership
from dispatcher.reconcile import Reconciler
from dispatcher.reissue import Reissuer
from dispatcher.releaser import CLAIM_LEASE_SECONDS, REANNOUNCE_SECONDS, Releaser
from dispatcher.store import Due, Store
from schemas.messages import EventRange, StatusUpdate
from transport.interface import Incoming, Transport
from transport.outage import is_outage, patiently

log = logging.getLogger(__name__)

# how often jobs with ranges ready and no consumer are looked for (their only worker
# died: RabbitMQ gave its ranges back at once, but nobody consumes them), at most; a job
# is announced once found so twice in a row (a worker that just took its announcement
# and sets it up says so with its next heartbeat, a moment later)
UNCONSUMED_CHECK_SECONDS = 0.5
# a range that came back while its worker seemed alive (a broker node died under the
# worker, say) is charged if the worker stays silent this long after: a live one
# reconnects and sends heartbeats every second for a while (Worker.reconnected)
HELD_GRACE = 2.5
# the event counters' delta rows are folded this often: a busy run adds a few per
# bookkeeping batch, and a count reads them all
COMPACT_COUNTS_SECONDS = 5.0


class ControlPlane:
    def __init__(self, settings: Settings, store: Store, broker: Transport) -> None:
        self.settings = settings
        self.store = store
        self.broker = broker
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.releaser = Releaser(store, broker, window=settings.release_window, owner=self.id)
        self.leadership = Leadership(settings.database_url, self.id)
        self.finisher = Finisher(store, broker, on_task_end=self.releaser.wake)
        self.reissuer = Reissuer(store, broker, self.releaser)
        self.reconciler = Reconciler(store, broker, self.releaser, self.finisher)
        self._seen_unconsumed: set[int] = set()  # jobs found with ranges and no consumer last round
        self.bookkeeper = Bookkeeper(
            store, broker, self.finisher, self.reissuer, batch_size=settings.batch_size, linger=settings.batch_linger
        )

    async def close(self) -> None:
        await self.broker.close()
        await self.store.close()

    async def recover(self) -> None:
        """Pick up where a previous control plane stopped: finish what is done, announce
        again every job with work (an announcement without work costs a worker one get)."""
        await self.finisher.check(await self.store.unfinished_jobs())
        await self.store.finish_workflows(await self.store.running_workflows())
        await self.releaser.announce_ids(await self.store.unfinished_jobs())
        self.releaser.wake()

    async def run(self, stop: asyncio.Event) -> None:
        await self.recover()
        await self.bookkeeper.start()
        stop_dead = await self.broker.consume(self.broker.names.dead_ranges, self._on_dead_range, prefetch=16)
        tasks: list[asyncio.Task[object]] = [
            asyncio.create_task(self.releaser.run(), name="releaser"),
            asyncio.create_task(self.bookkeeper.run(), name="bookkeeper"),
            asyncio.create_task(self._listen(), name="listener"),
            asyncio.create_task(self.leadership.run(), name="leadership"),
            asyncio.create_task(self._watchdog(), name="watchdog"),
            asyncio.create_task(self._unconsumed(), name="unconsumed"),
            asyncio.create_task(self._every(UNCONSUMED_CHECK_SECONDS, self.charge_held, "held"), name="held"),
            asyncio.create_task(self.finisher.delete_queues(), name="queue deleter"),
            asyncio.create_task(
                self._every(COMPACT_COUNTS_SECONDS, self.store.compact_event_counts, "counts"), name="counts"
            ),
            asyncio.create_task(
                self._every(CLAIM_LEASE_SECONDS / 4, self.releaser.renew_claims, "claims", everyone=True),
                name="claims",
            ),
        ]
        log.info("control plane running", extra={"prefix": self.settings.names.prefix or "-"})
        waiter = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        # stop taking status messages, apply what was taken, then stop the rest; a
        # release in progress is let finish (cancelling it mid-publish would leave the
        # job half-published until the next start reclaims it)
        await self.bookkeeper.stop()
        await stop_dead()
        async with self.releaser.busy:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.bookkeeper.flush()
        for task in done:
            if task is not waiter and task.exception():
                raise task.exception()  # type: ignore[misc]
        log.info("control plane stopped")

    async def _listen(self) -> None:
        """Wake the releaser on every submission (Postgres NOTIFY), reconnecting as needed."""
        delay = 0.5
        while True:
            try:
                conn = await asyncpg.connect(self.settings.database_url)
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("cannot listen for submissions yet", extra={"error": str(exc), "retry_in": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            delay = 0.5
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _c, lost=lost: lost.set())
            try:
                await conn.add_listener("dispatcher_submitted", lambda *_: self.releaser.wake())
                self.releaser.wake()  # a submission may have arrived while not listening
                await lost.wait()
                log.warning("lost the submission listener; reconnecting")
            finally:
                with contextlib.suppress(Exception):
                    await conn.close()

    async def _watchdog(self) -> None:
        """Timeouts only: workers that stopped reporting, and the work they left."""
        await self._every(self.settings.heartbeat_interval, self.find_lost_work, "watchdog")

    async def _unconsumed(self) -> None:
        await self._every(
            min(UNCONSUMED_CHECK_SECONDS, self.settings.heartbeat_interval), self.announce_unconsumed, "unconsumed"
        )

    async def _every(
        self, seconds: float, round_: Callable[[], Awaitable[object]], what: str, *, everyone: bool = False
    ) -> None:
        """Run ``round_`` every ``seconds``: on the leader only, unless ``everyone``."""
        while True:
            await asyncio.sleep(seconds)
            if not (everyone or self.leadership.is_leader):
                continue
            try:
                await round_()
            except Exception as exc:  # a safety net: it must outlive any bug
                if is_outage(exc):
                    log.warning("%s skipped a round: service unavailable", what, extra={"error": repr(exc)})
                else:
                    log.exception("%s round failed", what)

    async def announce_unconsumed(self) -> list[int]:
        """Announce at once every active job whose queue has ranges ready and no consumer:
        its only worker died (RabbitMQ gave its ranges back), or a retry arrived after
        every worker left. Not waiting for the worker to be declared lost is what brings
        lost work back in seconds. Returns the jobs announced."""
        names = self.broker.names
        waiting = await self.broker.queue_depth(names.jobs) or 0
        clock = time.monotonic()
        unconsumed = []
        seen, self._seen_unconsumed = self._seen_unconsumed, set()
        for job_id in await self.store.jobs_not_being_set_up():
            state = await self.broker.queue_state(names.job(job_id))
            if state is None or state[0] == 0 or state[1] > 0:
                continue
            self._seen_unconsumed.add(job_id)
            if job_id not in seen:
                continue  # the first sighting: a worker may be taking it up right now
            if waiting and self.releaser.announced.age(job_id, clock) < REANNOUNCE_SECONDS:
                continue  # its announcement likely waits for a free worker
            unconsumed.append(job_id)
        if unconsumed:
            log.warning("announcing jobs nobody consumes", extra={"jobs": unconsumed[:20], "count": len(unconsumed)})
            await self.releaser.announce_ids(unconsumed)
        return unconsumed

    async def charge_held(self) -> None:
        """Charge the events whose range came back while their worker seemed alive, once
        it has been silent for HELD_GRACE seconds since (see held_returns in the SQL)."""
        await self._charge(await self.store.return_held(HELD_GRACE))

    async def _charge(self, due: list[Due]) -> None:
        if due:
            log.warning("events lost with their worker", extra={"events": len(due)})
            await patiently(lambda: self.reissuer.publish(due), what="issuing attempts")
            await patiently(lambda: self.finisher.check({d.job_id for d in due}), what="finishing")

    async def find_lost_work(self) -> list[int]:
        """Announce again every job that has ranges waiting and no live worker serving it
        (its workers died or left before a retry or a given-back range arrived). Returns
        the jobs announced. Skipped while announcements wait: idle workers take those first."""
        lost_workers = await self.store.mark_lost_workers(3 * self.settings.heartbeat_interval)
        for worker in lost_workers:
            log.warning("worker lost: no heartbeat", extra={"worker": worker})
        # what they ran is charged now: their ranges may have been acked, and nobody else reports it
        await self._charge(await self.store.return_running_under(lost_workers))
        await self.releaser.reclaim(CLAIM_LEASE_SECONDS)
        await self.reconciler.round()
        if await self.broker.queue_depth(self.broker.names.jobs):
            return []
        lost = [
            j for j in await self.store.unattended_jobs() if await self.broker.queue_depth(self.broker.names.job(j))
        ]
        if lost:
            log.warning("announcing unattended jobs again", extra={"jobs": lost[:20], "count": len(lost)})
            await self.releaser.announce_ids(lost)
        return lost

    async def _on_dead_range(self, message: Incoming) -> None:
        """A range RabbitMQ dead-lettered from a job's queue (a policy's delivery limit or
        TTL): its events are returned, as if its worker had been lost, so that none stays
        'running' and none is lost. The range only selects events: what runs next comes
        from Postgres. One that does not decode, or claims a job other than the queue it
        died in, goes to es.dlq."""
        names = self.broker.names
        headers = message.headers or {}
        deaths = headers.get("x-death")
        # the latest death first (a retry's range died in its delay queue before)
        queue = deaths[0].get("queue") if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict) else None
        rng = await self.broker.decode_or_dead_letter(message, EventRange, source=names.dead_ranges)
        if rng is None:
            return
        if queue is not None and str(queue) != names.job(rng.job_id):
            reason = f"range of job {rng.job_id} dead-lettered from queue {queue!s}"
            await self.broker.dead_letter(message.body, reason, source=names.dead_ranges)
            await message.ack()
            return
        updates = [
            StatusUpdate(
                job_id=rng.job_id,
                number=e.number,
                attempt=e.attempt,
                status="returned",
                worker="rabbitmq",
                issue=e.issue,
            )
            for e in rng.events
        ]
        applied = await patiently(lambda: self.store.apply_batch(updates), what="dead range")
        await patiently(lambda: self.reissuer.publish(applied.due), what="dead range")
        await message.ack()
        await patiently(lambda: self.finisher.check([rng.job_id]), what="finishing")
