"""The worker loop: get job -> set up once -> take event ranges until the job has none
left -> run each payload -> report -> ack -> tear down -> write one log for the job.

Every slot runs one event range at a time (``--slots N``: up to N events at once). A
worker consumes a job's queue with a bounded prefetch (``--prefetch``, default one range
per slot), so it never hides more than that from other workers. A slot does not wait
for the confirm of its statuses: the range is acked in the background once they are safe
in es.status. A larger prefetch keeps slots busy between a range's end and its ack (for
payloads of a few milliseconds it is worth it); a worker that dies then charges nothing to
the ranges it held without having started them (Postgres saw them queued). A job is
found through an announcement on es.jobs, taken only while a slot is free; when a worker
takes a job that has more ranges than it takes at once, it passes the announcement on so
idle workers join.

The rooms: this module is the worker (lifecycle and grace, slots, announcements,
heartbeats, control messages); ``workers.ranges`` runs a range and reports it;
``workers.job`` is a job's set-up, its holders and its tear-down; ``workers.joblog`` the
job log; ``workers.reporter`` the status batches. A worker publishes status batches and
nothing else (the trust model).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Coroutine
from pathlib import Path
from typing import Any

from schemas.messages import CancelJobs, Heartbeat, JobAnnouncement, JobLog, MessageError, decode
from schemas.text import storable
from transport.interface import Announcements, Delivery, Incoming, Transport
from transport.outage import is_outage
from workers.job import Hold, Job, set_up, tear_down
from workers.payload import now, reap_orphans
from workers.ranges import Ran, RangeRunner, refused
from workers.reporter import StatusReporter

log = logging.getLogger(__name__)

# after a reconnect, heartbeats every second for this long (see Worker._reconnected)
FAST_HEARTBEATS_SECONDS = 6.0


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Worker:
    def __init__(
        self,
        broker: Transport,
        *,
        slots: int = 1,
        work_dir: Path,
        log_dir: Path,
        worker_id: str | None = None,
        grace: float = 30.0,
        heartbeat_interval: float = 5.0,
        prefetch: int | None = None,
    ) -> None:
        self.broker = broker
        self.names = broker.names
        self.slots = slots
        self.prefetch = prefetch or slots
        self.work_dir = work_dir
        self.log_dir = log_dir
        self.id = worker_id or new_worker_id()
        self.grace = grace
        self.heartbeat_interval = heartbeat_interval
        self.reporter = StatusReporter(broker, self.id)
        self.reporter.before_publish = self._flush_logs
        self.ranges = RangeRunner(self.id, self.reporter, stopping=lambda: self._stopping)
        self.jobs: dict[int, Job] = {}
        self.started_at = now()
        self._announcement_lock = asyncio.Lock()
        self._announcements: Announcements | None = None
        self._stopping = False
        self._setting_up: set[int] = set()  # jobs whose set-up runs (their queue not consumed yet)
        self._looking: asyncio.Task[object] | None = None  # the slot waiting for an announcement
        # ranges being concluded (reported, then acked once confirmed) and tear-downs
        self._background: set[asyncio.Task[None]] = set()
        self._fast_heartbeats_until = 0.0  # monotonic: heartbeats every second until then

    @property
    def events_done(self) -> int:
        return self.ranges.events_done

    async def run(self, stop: asyncio.Event) -> None:
        """Serve jobs until ``stop`` is set; then take no new range, let running events
        finish for ``grace`` seconds, give back what did not run, and return."""
        # payloads a killed predecessor on this host left running (their leaders die
        # with their worker; what those started does not)
        if reaped := reap_orphans():
            log.warning("killed payloads a lost worker left behind", extra={"processes": reaped})
        self.broker.on_reconnect(self._reconnected)
        self._announcements = await self.broker.announcements()
        await self.broker.listen_control(self._on_control)
        reporter = asyncio.create_task(self.reporter.run(), name="reporter")
        heartbeat = asyncio.create_task(self._heartbeats(), name="heartbeat")
        slots = [asyncio.create_task(self._slot(), name=f"slot-{i}") for i in range(self.slots)]
        log.info("worker started", extra={"worker": self.id, "slots": self.slots})
        stopper = asyncio.create_task(stop.wait())
        # a slot or the reporter that ends by itself has failed: stop rather than hang
        await asyncio.wait([stopper, reporter, *slots], return_when=asyncio.FIRST_COMPLETED)
        self._stopping = True
        self.reporter.heartbeat(self._heartbeat("stopping"))
        for job in list(self.jobs.values()):  # take no new range (what was delivered goes back)
            await job.queue.stop_consuming()
        if self._looking is not None:  # waiting for an announcement: nothing to finish
            self._looking.cancel()
        _, late = await asyncio.wait(slots, timeout=self.grace)
        if late:
            log.warning("grace period over: stopping running payloads", extra={"slots": len(late)})
            for slot in late:
                slot.cancel()
            await asyncio.wait(late)
        while self._background:  # acks (a range is acked once its statuses are safe) and tear-downs
            await asyncio.wait(set(self._background))
        for job in list(self.jobs.values()):
            await self._leave(job)
        heartbeat.cancel()
        if not reporter.done():
            self.reporter.heartbeat(self._heartbeat("stopped"))
            await self.reporter.flush()
            reporter.cancel()
        stopper.cancel()
        await asyncio.gather(reporter, heartbeat, stopper, return_exceptions=True)
        for task in [reporter, *slots]:  # a failure, not a stop: let the caller see it
            if not task.cancelled() and task.exception():
                raise task.exception()  # type: ignore[misc]
        log.info("worker stopped", extra={"worker": self.id, "events": self.ranges.events_done})

    def _flush_logs(self) -> None:
        for job in self.jobs.values():
            job.log.flush()

    # -- heartbeats and control -------------------------------------------------------

    def _heartbeat(self, state: str = "live") -> Heartbeat:
        return Heartbeat(
            host=socket.gethostname(),
            pid=os.getpid(),
            slots=self.slots,
            state=state,  # type: ignore[arg-type]
            jobs=sorted(self.jobs),
            setting_up=sorted(self._setting_up),
            events_done=self.ranges.events_done,
            started_at=self.started_at,
        )

    async def _heartbeats(self) -> None:
        """Tells the control plane which jobs this worker serves; silence means lost."""
        while True:
            self.reporter.heartbeat(self._heartbeat("stopping" if self._stopping else "live"))
            fast = time.monotonic() < self._fast_heartbeats_until
            await asyncio.sleep(min(self.heartbeat_interval, 1.0) if fast else self.heartbeat_interval)

    def _reconnected(self) -> None:
        """Back after the broker (or our node of it) was lost. Our unacked ranges went back
        and come again to someone, as if we had died: we say at once, and every second for
        a while, that we live, so that the control plane leaves the events we run to us
        (HELD_GRACE in dispatcher.control) instead of charging them an attempt."""
        log.warning("connection to the broker restored", extra={"worker": self.id})
        self._fast_heartbeats_until = time.monotonic() + FAST_HEARTBEATS_SECONDS
        self.reporter.heartbeat(self._heartbeat("stopping" if self._stopping else "live"))
        self.reporter.hurry()

    async def _on_control(self, message: Incoming) -> None:
        try:
            cancel = decode(message.body, CancelJobs)
        except MessageError as exc:
            log.warning("ignored a control message", extra={"error": str(exc)})
            return
        for job_id in cancel.job_ids:
            job = self.jobs.get(job_id)
            if job is not None:
                log.info("job cancelled: stopping its payloads", extra={"job": job_id, "running": len(job.running)})
                job.cancel()
                # slots waiting for its ranges stop waiting (its queue is deleted soon)
                self._in_background(job.queue.stop_consuming())

    # -- running ranges ---------------------------------------------------------------

    async def _slot(self) -> None:
        pause = 0.25
        while not self._stopping:
            try:
                got = await self._next_range()
            except Exception as exc:
                if not is_outage(exc):
                    raise
                # the broker is away: the robust connection comes back
                log.warning("slot waiting for the broker", extra={"error": repr(exc), "retry_in": pause})
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)
                continue
            pause = 0.25
            if got is None:
                return
            hold, message = got
            with hold:
                try:
                    ran = await self.ranges.run(hold.job, message)
                except Exception as exc:
                    if not is_outage(exc):
                        raise
                    self._abandoned(hold.job, exc)
                    continue
                # the slot takes its next range at once: what ran is logged, reported and
                # acked once its statuses are safe, in the background, while the next
                # payload runs
                self._in_background(self._conclude(hold.pass_on(), message, ran))

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as a task the worker keeps (and waits for when it stops)."""
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _conclude(self, hold: Hold, message: Delivery, ran: Ran) -> None:
        with hold:
            try:
                await self.ranges.conclude(hold.job, message, ran)
            except Exception as exc:
                if not is_outage(exc):
                    raise
                self._abandoned(hold.job, exc)

    @staticmethod
    def _abandoned(job: Job, exc: BaseException) -> None:
        # unacked: the broker delivers the range again once its channel is gone
        log.warning("range abandoned: broker unavailable", extra={"job": job.id, "error": repr(exc)})

    async def _next_range(self) -> tuple[Hold, Delivery] | None:
        """The next range to run, with a hold on its job; None once the worker is stopping."""
        while not self._stopping:
            for job in list(self.jobs.values()):
                # a drained job still held is served what reached it after its queue
                # looked empty (a quorum queue delivers ranges it had checked out to us
                # after the consumer's cancel): given back, each would be returned and
                # issued again instead of run
                if job.drained and (job.queue.idle or job.leaving or job.cancelled):
                    continue
                hold = job.hold()  # before the get: see workers.job
                if job.queue.idle and job.queue.full:
                    # nothing at hand, and the broker sends the next range only for an
                    # acked one: the statuses those acks wait for leave now (not while
                    # ranges are still on their way: batches would leave small, each a
                    # status message, a bookkeeping transaction and an ack)
                    self.reporter.hurry()
                try:
                    message = await job.queue.get()
                except BaseException:
                    hold.release()
                    raise
                if message is None:
                    job.drain()
                    hold.release()
                    continue
                return hold, message
            async with self._announcement_lock:
                if self._stopping or any(not j.drained for j in self.jobs.values()):
                    continue  # stopping, or another slot found a job while we waited for the lock
                self._looking = asyncio.current_task()
                try:
                    await self._take_announcement()
                finally:
                    self._looking = None
        return None

    # -- finding jobs -----------------------------------------------------------------

    async def _take_announcement(self) -> None:
        assert self._announcements is not None
        message = await self._announcements.next()
        try:
            spec = decode(message.body, JobAnnouncement)
        except MessageError as exc:  # never run: reported with its reason, for es.dlq
            await self._refuse(message.body, self.names.jobs, str(exc))
            await message.ack()
            return
        job = self.jobs.get(spec.job_id)
        if job is not None:
            if job.reopen():  # new work in a job we still hold
                await job.queue.resume()
                self._invite(job)
        else:
            try:
                await self._setup(spec)
            except Exception as exc:
                if is_outage(exc):
                    raise  # the announcement is not acked: it comes back
                # cannot run this job here (e.g. its payload function does not import)
                log.error("job set-up failed", extra={"job": spec.job_id, "error": repr(exc)})
                await self._refuse(message.body, self.names.jobs, f"set-up failed: {exc!r}", setup_failed=spec.job_id)
        await message.ack()

    def _refuse(self, body: bytes, source: str, reason: str, *, setup_failed: int | None = None) -> Awaitable[None]:
        """Report a message this worker will not take; resolves once that is confirmed."""
        log.warning("refused a message", extra={"source": source, "reason": storable(reason, 300)})
        return self.reporter.report(refused=[refused(body, source, reason, setup_failed)])

    async def _setup(self, spec: JobAnnouncement) -> None:
        # the queue is named by the job's id, never by the message
        queue = await self.broker.open_job(self.names.job(spec.job_id), prefetch=self.prefetch, consume=False)
        if queue.backlog is None:
            # an announcement of a job that ended (its queue is deleted), passed on or
            # sent again: setting it up would cost its set-up command for nothing. (With
            # nothing ready but the queue there, it is set up: a retry's range may reach
            # the queue a moment after its announcement reached es.jobs.)
            await queue.close()
            log.debug("announced job has ended: not set up", extra={"job": spec.job_id})
            return
        # said at once: the control plane must not take a job nobody consumes during its
        # set-up for one whose worker died
        self._setting_up.add(spec.job_id)
        self.reporter.heartbeat(self._heartbeat())
        self.reporter.hurry()
        try:
            job = await set_up(
                spec, queue, work_root=self.work_dir, log_dir=self.log_dir, worker=self.id, on_drained=self._drained
            )
        finally:
            self._setting_up.discard(spec.job_id)
        self.jobs[spec.job_id] = job
        self.reporter.heartbeat(self._heartbeat())
        # where the log is, for the monitor (known from set-up on: a worker may die later)
        self.reporter.report(logs=[JobLog(job_id=spec.job_id, path=str(job.log.path.resolve()))])
        self._invite(job)
        log.info("job set up", extra={"job": spec.job_id, "label": spec.label, "worker": self.id})

    def _invite(self, job: Job) -> None:
        """More ranges ready than we take at once: ask the control plane, once, to
        announce the job again so that an idle worker joins (with the next batch: an
        invitation lost with the broker only means nobody joins)."""
        if not job.invited and (job.queue.backlog or 0) > self.prefetch:
            job.invited = True
            self.reporter.invite(job.id)

    # -- leaving jobs -----------------------------------------------------------------

    def _drained(self, job: Job) -> None:
        """The last holder of a drained job is done: tear it down in the background (its
        log upload need not hold up the next job, whose set-up goes on meanwhile)."""
        self._in_background(self._leave(job))

    async def _leave(self, job: Job) -> None:
        if self.jobs.get(job.id) is not job:
            return
        del self.jobs[job.id]
        try:
            await tear_down(job, worker=self.id)
        except Exception as exc:  # in the background: nobody else would hear of it
            log.error("job tear-down failed", extra={"job": job.id, "error": repr(exc)})
        self.reporter.heartbeat(self._heartbeat("stopping" if self._stopping else "live"))
        log.info("job torn down", extra={"job": job.id, "events": job.events_done, "worker": self.id})
