"""Releaser: publishes the event ranges of jobs whose task may run.

A task is released when every task it depends on has finished. Its jobs are then
published a window at a time (``release_window`` jobs with a queue at once), so that
RabbitMQ holds a bounded number of queues however large the workflow. It wakes on
events (a submission, a finished task or job) and never polls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence

from dispatcher.store import JobToPublish, Store
from schemas.messages import EventRange, EventSpec, JobAnnouncement, PayloadSpec, encode
from transport.interface import Transport
from transport.outage import is_outage

log = logging.getLogger(__name__)

# jobs published at once: each job's ranges are pipelined already, and a job published
# alone is announced sooner (submit -> first event running)
PUBLISH_CONCURRENCY = 2
# ranges of a window's first job published, and announced, before the rest of it: the
# confirms of a thousand ranges took 30 ms, a third of submit -> first event running
FIRST_RANGES = 32
# a job announced this recently is not announced again on request (an invitation, a job
# nobody consumes while announcements wait for free workers): it would only pile up
REANNOUNCE_SECONDS = 10.0
# a job is announced on a worker's invitation at most this often
INVITE_SECONDS = 1.0
# a control plane's claim on a job it publishes lasts this long unless renewed (the
# control plane renews it every CLAIM_LEASE_SECONDS / 4); another takes the job over
# only once it has run out
CLAIM_LEASE_SECONDS = 10.0
# ranges published between two checks that the claim is still ours (fencing: a control
# plane that stalled and lost its jobs publishes no more than the batch it was in)
PUBLISH_CHUNK = 256


class ClaimLost(Exception):
    """Another control plane took the job over: publish nothing more of it."""


class Recent:
    """When each job was last announced (in one way), in memory of a bounded size: the
    oldest half is forgotten when it holds ``limit`` jobs (what a forgotten job costs is
    at most one announcement more)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._at: dict[int, float] = {}

    def age(self, job_id: int, clock: float) -> float:
        """Seconds since ``job_id`` was marked (infinite if it never was, or is forgotten)."""
        at = self._at.get(job_id)
        return float("inf") if at is None else clock - at

    def mark(self, job_ids: Iterable[int], clock: float) -> None:
        for job_id in job_ids:
            self._at[job_id] = clock
        if len(self._at) > self.limit:
            for job_id in sorted(self._at, key=self._at.__getitem__)[: len(self._at) // 2]:
                del self._at[job_id]


def announcement(job: JobToPublish) -> JobAnnouncement:
    return JobAnnouncement(
        workflow_id=job.workflow_id,
        task_id=job.task_id,
        job_id=job.id,
        label=job.label,
        payload=PayloadSpec.model_validate(job.payload),
    )


class Releaser:
    def __init__(self, store: Store, broker: Transport, *, window: int, owner: str | None = None) -> None:
        self.store = store
        self.broker = broker
        self.window = window
        self.owner = owner  # the control plane that claims jobs (None: a one-shot command)
        # jobs this releaser claimed and has not published whole yet: a publish that failed
        # (the broker away) leaves them here, and the next round publishes them again (their
        # lease, renewed by this control plane, keeps any other from taking them over)
        self.unfinished: set[int] = set()
        self._wake = asyncio.Event()
        # held while publishing: stopping waits for it, so no publish is cut in half
        self.busy = asyncio.Lock()
        self.announced = Recent(10 * max(window, 100))  # by this releaser, in any way
        self.invited = Recent(10 * max(window, 100))  # on a worker's invitation

    async def renew_claims(self) -> None:
        """Renew the lease on the jobs this releaser is publishing (and only those: a job
        it claimed and no longer works on must be free to be taken over)."""
        if self.owner is not None and self.unfinished:
            await self.store.renew_claims(self.owner, sorted(self.unfinished))

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.release_once()
            except Exception as exc:
                if not is_outage(exc):
                    raise
                # claimed jobs stay 'releasing' and are reclaimed; try again shortly
                log.warning("release failed: service unavailable", extra={"error": repr(exc)})
                await asyncio.sleep(1.0)
                self.wake()

    async def release_once(self) -> int:
        """Release what may run now; returns the number of jobs published."""
        async with self.busy:
            return await self._release()

    async def _release(self) -> int:
        for task in await self.store.release_ready_tasks():
            log.info("task released", extra={"workflow": task["workflow_id"], "task": task["label"]})
        published = 0
        if self.unfinished:
            job_ids = sorted(self.unfinished)
            log.warning("publishing again jobs whose publish failed", extra={"jobs": job_ids[:20]})
            await self.publish_jobs(job_ids, fenced=True, resume=True)
            published += len(job_ids)
        while job_ids := await self.store.claim_jobs(self.window, self.owner):
            await self.publish_jobs(job_ids, fenced=True)
            published += len(job_ids)
        return published

    async def reclaim(self, older_than: float) -> None:
        """Take over jobs a control plane left half-published (it died, or stalled past
        its lease): publish what comes after the point its publication had reached
        (``jobs.published_upto``). What it published stays as it is, in the queue or with
        the workers that took it: nothing is published twice. (Should it have recorded a
        batch and died before sending it, the reconciliation finds those events waiting
        once the job's queue is empty.)"""
        async with self.busy:
            job_ids = await self.store.reclaim_stale_releasing(older_than, self.owner)
            if job_ids:
                log.warning("taking over jobs left half-published", extra={"jobs": len(job_ids)})
                await self.publish_jobs(job_ids, fenced=True, resume=True)

    async def republish(self, job_ids: Sequence[int]) -> None:
        """Publish again, as new copies, what has not started in jobs whose queue lost its
        ranges (a queue purged or lost with a disk, found by the reconciliation)."""
        async with self.busy:
            for job_id in job_ids:
                await self.broker.purge_queue(self.broker.names.job(job_id))
            await self.store.reissue_stale_jobs(job_ids)  # what a worker may hold is stale now
            await self.publish_jobs(job_ids)

    async def publish_jobs(self, job_ids: Sequence[int], *, fenced: bool = False, resume: bool = False) -> None:
        """Publish jobs' ranges and announce them. ``fenced``: jobs claimed by this
        control plane, published only while the claim is still ours, and how far each
        batch goes recorded first. ``resume``: only what comes after that point."""
        jobs = await self.store.jobs_to_publish(job_ids)
        limit = asyncio.Semaphore(PUBLISH_CONCURRENCY)
        if fenced:
            self.unfinished.update(job.id for job in jobs)

        async def release(job: JobToPublish, *, early: bool = False) -> None:
            # each job announced as soon as its ranges are in: the first events start
            # while the rest of the window is still being published
            async with limit:
                try:
                    ranges = await self._publish_ranges(job, early=early, fenced=fenced, resume=resume)
                except ClaimLost:
                    log.warning("job taken over by another control plane: publishing stopped", extra={"job": job.id})
                    self.unfinished.discard(job.id)
                    return
                # queued in the bookkeeping before announced: a worker's first status finds it queued
                await self.store.mark_jobs_queued([job.id])
                self.unfinished.discard(job.id)
                if ranges is None or await self._left_early(job, ranges):
                    await self.announce([job])

        if jobs:  # the first job alone, at full speed: the first events start sooner
            await release(jobs[0], early=True)
        await asyncio.gather(*(release(job) for job in jobs[1:]))

    async def invite(self, job_ids: Sequence[int]) -> None:
        """Workers asked for these jobs to be announced (more ranges wait than they take):
        only active jobs, each at most once per INVITE_SECONDS (a worker's status batch
        must not flood es.jobs)."""
        clock = time.monotonic()
        fresh = [j for j in job_ids if self.invited.age(j, clock) >= INVITE_SECONDS]
        if not fresh:
            return
        active = set(await self.store.active_jobs())
        fresh = [j for j in fresh if j in active]
        self.invited.mark(fresh, clock)
        await self.announce_ids(fresh)

    async def announce_ids(self, job_ids: Sequence[int], *, delay: float | None = None) -> None:
        if job_ids:
            await self.announce(await self.store.jobs_to_publish(job_ids), delay=delay)

    async def announce(self, jobs: Sequence[JobToPublish], *, delay: float | None = None) -> None:
        """Announce jobs on es.jobs (``delay``: through a delay queue, behind a retry)."""
        names = self.broker.names
        if delay is None:
            await self.broker.publish_many((names.jobs, encode(announcement(job))) for job in jobs)
        else:
            for job in jobs:
                await self.broker.publish_delayed(names.jobs, encode(announcement(job)), delay)
        self.announced.mark((job.id for job in jobs), time.monotonic())

    async def _left_early(self, job: JobToPublish, ranges: int) -> bool:
        """A job announced early: did a worker take ranges and leave before the rest
        came? Then it is announced again. Not otherwise: its announcement still waits, or
        a worker sets the job up or runs it, and a second one would only bring another
        worker to set it up. (One leaving at this very moment is found by the watchdog,
        as any job with work and no worker.)"""
        state = await self.broker.queue_state(self.broker.names.job(job.id))
        return state is not None and state[1] == 0 and state[0] < ranges

    async def _publish_ranges(
        self, job: JobToPublish, *, early: bool = False, fenced: bool = False, resume: bool = False
    ) -> int | None:
        """All of a job's ranges into its queue (declared here). ``early``: announced
        once its first ranges are in, so that a worker starts on them while the rest
        follow; then returns how many ranges it has. Until all are in the job stays
        'releasing', and a control plane that dies meanwhile leaves it to be published
        again whole: its first ranges may then run twice, which the bookkeeping absorbs
        as it does a redelivery."""
        queue = self.broker.names.job(job.id)
        await self.broker.declare_job_queue(queue)
        rows = await self.store.job_events(job.id, after=job.published_upto if resume else None)
        size = job.events_per_range
        messages: list[tuple[int, tuple[str, bytes]]] = []  # (its last event, the range)
        for start in range(0, len(rows), size):
            events = [
                EventSpec(number=r["number"], payload=r["payload"], attempt=r["attempt"], issue=r["issue"])
                for r in rows[start : start + size]
            ]
            body = encode(EventRange(workflow_id=job.workflow_id, job_id=job.id, events=events))
            messages.append((events[-1].number, (queue, body)))
        ranges = len(messages)
        announced = early and ranges > FIRST_RANGES
        if announced:
            await self._publish_claimed(job, messages[:FIRST_RANGES], fenced)
            await self.announce([job])
            messages = messages[FIRST_RANGES:]
        await self._publish_claimed(job, messages, fenced)
        log.debug("job published", extra={"job": job.id, "events": len(rows), "ranges": ranges})
        return ranges if announced else None

    async def _publish_claimed(
        self, job: JobToPublish, messages: list[tuple[int, tuple[str, bytes]]], fenced: bool
    ) -> None:
        """Publish in batches; ``fenced``: each once the job is found still ours, and how
        far it goes recorded (one statement), so that a control plane taking the job
        over starts after it."""
        for start in range(0, len(messages), PUBLISH_CHUNK):
            chunk = messages[start : start + PUBLISH_CHUNK]
            if fenced and not await self.store.publishing(job.id, self.owner, CLAIM_LEASE_SECONDS, chunk[-1][0]):
                raise ClaimLost(job.id)
            await self.broker.publish_many(message for _, message in chunk)
