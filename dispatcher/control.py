"""The control plane (``dispatcher start``): releaser, bookkeeper and finisher in one
asyncio process, wired together here. Several copies may run side by side."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg
from aio_pika.abc import AbstractIncomingMessage

from dispatcher.bookkeeper import Bookkeeper
from dispatcher.broker import Broker
from dispatcher.config import Settings
from dispatcher.finisher import Finisher
from dispatcher.releaser import Releaser
from dispatcher.retry import TRANSIENT, patiently
from dispatcher.store import Store
from schemas.messages import DeadLetter, EventRange, StatusUpdate, encode
from workers.payload import now

log = logging.getLogger(__name__)

# a claim older than this belongs to a control plane that died while publishing
STALE_CLAIM_SECONDS = 30.0


class ControlPlane:
    def __init__(self, settings: Settings, store: Store, broker: Broker) -> None:
        self.settings = settings
        self.store = store
        self.broker = broker
        self.releaser = Releaser(store, broker, window=settings.release_window)
        self.finisher = Finisher(store, broker, on_task_end=self.releaser.wake)
        self.bookkeeper = Bookkeeper(
            store, broker, self.finisher, batch_size=settings.batch_size, linger=settings.batch_linger
        )

    @classmethod
    async def connect(cls, settings: Settings) -> ControlPlane:
        store = await Store.connect(settings.database_url, max_size=6)
        await store.upgrade()
        broker = await Broker.connect(settings.amqp_url, settings.names, client="dispatcher-control")
        await broker.declare_topology()
        return cls(settings, store, broker)

    async def close(self) -> None:
        await self.broker.close()
        await self.store.close()

    async def recover(self) -> None:
        """Pick up where a previous control plane stopped: finish what is done, announce
        again every job with work (an announcement without work costs a worker one get)."""
        await self.finisher.check(await self.store.unfinished_jobs())
        await self.store.finish_workflows(await self.store.running_workflows())
        await self.releaser.reclaim(STALE_CLAIM_SECONDS)
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
            asyncio.create_task(self._watchdog(), name="watchdog"),
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
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            try:
                await self.find_lost_work()
            except TRANSIENT as exc:
                log.warning("watchdog skipped a round: service unavailable", extra={"error": repr(exc)})
            except Exception:  # the watchdog is the safety net: it must outlive any bug
                log.exception("watchdog round failed")

    async def find_lost_work(self) -> list[int]:
        """Announce again every job that has ranges waiting and no live worker serving it
        (its workers died or left before a retry or a given-back range arrived). Returns
        the jobs announced. Skipped while announcements wait: idle workers take those first."""
        for worker in await self.store.mark_lost_workers(3 * self.settings.heartbeat_interval):
            log.warning("worker lost: no heartbeat", extra={"worker": worker})
        await self.releaser.reclaim(STALE_CLAIM_SECONDS)
        if await self.broker.queue_depth(self.broker.names.jobs):
            return []
        lost = [
            j for j in await self.store.unattended_jobs() if await self.broker.queue_depth(self.broker.names.job(j))
        ]
        if lost:
            log.warning("announcing unattended jobs again", extra={"jobs": lost[:20], "count": len(lost)})
            await self.releaser.announce_ids(lost)
        return lost

    async def _on_dead_range(self, message: AbstractIncomingMessage) -> None:
        """A range RabbitMQ dead-lettered (a job queue's policy rejected or expired it):
        its events fail, each with a dead letter, so none stays 'running' in the
        bookkeeping. (Workers give up on ranges that keep killing them themselves.)"""
        rng = await self.broker.decode_or_dead_letter(message, EventRange, source=self.broker.names.dead_ranges)
        if rng is None:
            return
        jobs = await patiently(lambda: self.store.jobs_to_publish([rng.job_id]), what="dead range")
        label = jobs[0].label if jobs else "?"
        death = (message.headers or {}).get("x-first-death-reason")
        reason = f"RabbitMQ dead-lettered the range ({death!s})"
        updates = []
        for event in rng.events:
            attempt = event.attempt
            dead = DeadLetter(
                workflow_id=rng.workflow_id,
                job_id=rng.job_id,
                label=label,
                number=event.number,
                payload=event.payload,
                attempts=attempt,
                error=reason,
                at=now(),
            )
            await self.broker.publish(self.broker.names.dlq, encode(dead), headers={"x-reason": reason})
            updates.append(
                StatusUpdate(
                    job_id=rng.job_id,
                    number=event.number,
                    attempt=attempt,
                    status="failed",
                    worker="rabbitmq",
                    ended_at=now(),
                    error=reason,
                )
            )
        await patiently(lambda: self.store.apply(updates), what="dead range")
        await message.ack()
        await patiently(lambda: self.finisher.check([rng.job_id]), what="finishing")
