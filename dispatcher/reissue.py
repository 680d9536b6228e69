"""Reissuer: the control plane's half of retries. Every next attempt is issued here.

Workers report what happened (an attempt failed, a range came back, an event was given
back); the bookkeeping decides in Postgres what follows, and this publishes it: a failed
attempt with attempts left goes into a delay queue as the next attempt, an event that
came back goes back into its job's queue, an event out of attempts gets its dead letter.
The payloads come from Postgres. A worker may publish none of this (the trust model):
whoever could put ranges into job queues could make other workers run anything.

Each step is marked in Postgres once RabbitMQ confirmed it, and its status message is
acked only after that: a crash in between makes the message come back, and the step is
found due again (``followups``); a step is never lost. Every range published is a new
copy of its events (``events.issue``): a range of an older copy that comes back again is
stale and reissues nothing, so one range returned twice is not run twice.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from dispatcher.releaser import Releaser
from dispatcher.store import Due, Store
from schemas.messages import DeadLetter, EventRange, EventSpec, encode
from schemas.text import storable
from transport.interface import Transport
from transport.policy import backoff, delay_step

log = logging.getLogger(__name__)

class Reissuer:
    def __init__(self, store: Store, broker: Transport, releaser: Releaser) -> None:
        self.store = store
        self.broker = broker
        self.releaser = releaser  # announcements go out one way, so that they are counted

    async def publish(self, due: Sequence[Due]) -> None:
        """Publish every step in ``due`` (confirmed), then mark it done in Postgres. A job
        cancelled or ended meanwhile gets no new range (nor its queue back)."""
        if not due:
            return
        retries = [d for d in due if d.status == "retrying" and d.job_active]
        again = [d for d in due if d.status == "queued" and d.job_active]
        dead = [d for d in due if d.status == "failed"]
        if retries:
            await self._retry(retries)
        if again:
            await self._again(again)
        if dead:
            await self._dead_letter(dead)

    async def _retry(self, retries: Sequence[Due]) -> None:
        names = self.broker.names
        steps: dict[int, set[int]] = defaultdict(set)  # job -> delay steps used
        published: list[tuple[Due, datetime | None]] = []
        for d in retries:
            seconds = backoff(d.retry_delay, d.attempt)
            rng = EventRange(
                workflow_id=d.workflow_id,
                job_id=d.job_id,
                events=[EventSpec(number=d.number, payload=d.payload, attempt=d.attempt + 1, issue=d.issue)],
            )
            await self.broker.publish_delayed(names.job(d.job_id), encode(rng), seconds)
            step = delay_step(seconds)
            steps[d.job_id].add(step)
            published.append((d, datetime.now(UTC) + timedelta(milliseconds=step)))
            log.info(
                "event retry scheduled",
                extra={"job": d.job_id, "event": d.number, "attempt": d.attempt, "delay": round(seconds, 2)},
            )
        # each retry's announcement lands right behind it: a worker comes back for it
        # even if every worker has left the job
        for job_id, job_steps in steps.items():
            for step in sorted(job_steps):
                await self.releaser.announce_ids([job_id], delay=step / 1000)
        await self.store.published(published)

    async def _again(self, again: Sequence[Due]) -> None:
        """Events that came back, into their job's queue at once, in ranges of the task's
        size; each asks the worker to confirm its start first (``confirm_start``)."""
        names = self.broker.names
        by_job: dict[int, list[Due]] = defaultdict(list)
        for d in again:
            by_job[d.job_id].append(d)
        messages = []
        for job_id, events in by_job.items():
            events.sort(key=lambda d: d.number)
            size = max(1, events[0].events_per_range)
            for i in range(0, len(events), size):
                chunk = events[i : i + size]
                rng = EventRange(
                    workflow_id=chunk[0].workflow_id,
                    job_id=job_id,
                    events=[
                        EventSpec(number=d.number, payload=d.payload, attempt=d.attempt, issue=d.issue) for d in chunk
                    ],
                    confirm_start=True,  # a payload that kills its worker must be seen running
                )
                messages.append((names.job(job_id), encode(rng)))
            await self.broker.declare_job_queue(names.job(job_id))  # its job is active: keep its queue
        await self.broker.publish_many(messages)
        await self.releaser.announce_ids(list(by_job))
        await self.store.published([(d, None) for d in again])
        log.info("events issued again", extra={"events": len(again), "jobs": len(by_job)})

    async def _dead_letter(self, dead: Sequence[Due]) -> None:
        names = self.broker.names
        for d in dead:
            letter = DeadLetter(
                workflow_id=d.workflow_id,
                job_id=d.job_id,
                label=d.label,
                number=d.number,
                payload=d.payload,
                attempts=max(d.attempt, 1),
                error=d.error,
                worker=d.worker,
                at=datetime.now(UTC),
            )
            reason = storable(d.error or "failed", 1000)
            await self.broker.publish(names.dlq, encode(letter), headers={"x-reason": reason})
            log.warning(
                "event out of attempts: dead-lettered",
                extra={"job": d.job_id, "event": d.number, "attempts": d.attempt},
            )
        await self.store.dead_lettered(dead)
