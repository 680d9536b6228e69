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

A worker publishes status batches and nothing else (the trust model): a failed attempt
is reported, and the control plane issues the next one (into a delay queue) or the dead
letter; a range RabbitMQ delivers again (its holder was lost) is not run but returned to
the control plane, which charges an attempt only for events Postgres saw running; events
a worker gives up unfinished (a shutdown) are reported 'stopped' and issued again at the
same attempt; a message the worker cannot take is reported with its reason, for es.dlq.
Every event's part of the job log is appended to the job's one log file as it is reported.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from schemas.messages import (
    CancelJobs,
    EventRange,
    EventSpec,
    EventStatus,
    Heartbeat,
    JobAnnouncement,
    JobLog,
    MessageError,
    PayloadSpec,
    Refused,
    StatusUpdate,
    decode,
)
from schemas.text import storable
from transport.names import job_log_path
from transport.outage import is_outage
from transport.rabbitmq import Announcements, Broker, Delivery, JobQueue
from workers.joblog import JobLogFile, command_footer, command_header, event_footer, event_header
from workers.payload import CommandRunner, Outcome, Runner, now, reap_orphans, runner_for
from workers.reporter import StatusReporter

log = logging.getLogger(__name__)

# how long a worker stopping after its grace period waits to give back what it stopped
GIVE_BACK_SECONDS = 10.0


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def refused(body: bytes, source: str, reason: str, setup_failed: int | None = None) -> Refused:
    """A message this worker cannot take, for the control plane to dead-letter."""
    body64 = base64.b64encode(body[:700_000]).decode()
    return Refused(source=source, reason=reason, body=body64, setup_failed=setup_failed)


@dataclass
class Job:
    """A job this worker has set up."""

    spec: JobAnnouncement
    queue: JobQueue
    runner: Runner
    work_dir: Path
    log: JobLogFile  # the job's one log, shared with its other workers
    drained: bool = False
    cancelled: bool = False
    in_flight: int = 0
    invited: bool = False
    events_done: int = 0
    running: set[asyncio.Task[Any]] = field(default_factory=set)  # slots inside a payload


@dataclass(frozen=True)
class Ended:
    """An event whose payload ended (at the attempt its range named), not yet logged and
    reported."""

    event: EventSpec
    outcome: Outcome


@dataclass
class Ran:
    """What running a range left to do: report its events (updates made already, and
    ended payloads to log and report) and give back the rest (unstarted, or stopped by a
    shutdown), as 'stopped'."""

    finals: list[StatusUpdate | Ended] = field(default_factory=list)
    rest: list[EventSpec] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)


def _output(job: Job, event: EventSpec) -> str:
    """Where an event's payload writes its output, until it is appended to the job log."""
    return f"{job.work_dir}/event-{event.number}.out"


class Worker:
    def __init__(
        self,
        broker: Broker,
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
        self.jobs: dict[int, Job] = {}
        self.events_done = 0
        self.started_at = now()
        self._announcement_lock = asyncio.Lock()
        self._announcements: Announcements | None = None
        self._stopping = False
        self._setting_up: set[int] = set()  # jobs whose set-up runs (their queue not consumed yet)
        self._looking: asyncio.Task[object] | None = None  # the slot waiting for an announcement
        # acks waiting for their statuses' confirm, and consumers being stopped
        self._background: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        """Serve jobs until ``stop`` is set; then take no new range, let running events
        finish for ``grace`` seconds, give back what did not run, and return."""
        # payloads a killed predecessor on this host left running (their leaders die
        # with their worker; what those started does not)
        if reaped := reap_orphans():
            log.warning("killed payloads a lost worker left behind", extra={"processes": reaped})
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
            await self._teardown(job)
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
        log.info("worker stopped", extra={"worker": self.id, "events": self.events_done})

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
            events_done=self.events_done,
            started_at=self.started_at,
        )

    async def _heartbeats(self) -> None:
        """Tells the control plane which jobs this worker serves; silence means lost."""
        while True:
            self.reporter.heartbeat(self._heartbeat("stopping" if self._stopping else "live"))
            await asyncio.sleep(self.heartbeat_interval)

    async def _on_control(self, message: AbstractIncomingMessage) -> None:
        try:
            cancel = decode(message.body, CancelJobs)
        except MessageError as exc:
            log.warning("ignored a control message", extra={"error": str(exc)})
            return
        for job_id in cancel.job_ids:
            job = self.jobs.get(job_id)
            if job is not None:
                log.info("job cancelled: stopping its payloads", extra={"job": job_id, "running": len(job.running)})
                job.cancelled = job.drained = True
                for run in job.running:
                    run.cancel()
                # slots waiting for its ranges stop waiting (its queue is deleted soon)
                self._in_background(job.queue.stop_consuming())

    # -- finding work -----------------------------------------------------------------

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
            job, message = got
            ran: Ran | None = None
            try:
                ran = await self._run_range(job, message)
            except Exception as exc:
                if not is_outage(exc):
                    raise
                self._abandoned(job, exc)
            finally:
                if ran is None:
                    self._release(job)
            if ran is not None:
                # the slot takes its next range at once: what ran is settled, logged and
                # reported, and the range acked once its statuses are safe, in the background
                # (while the next payload runs: 0.28 -> 0.19 ms between two 50 ms payloads)
                self._in_background(self._conclude(job, message, ran))

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as a task the worker keeps (and waits for when it stops)."""
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _conclude(self, job: Job, message: Delivery, ran: Ran) -> None:
        try:
            await self._report_and_ack(job, message, ran)
        except Exception as exc:
            if not is_outage(exc):
                raise
            self._abandoned(job, exc)
        finally:
            self._release(job)

    @staticmethod
    def _abandoned(job: Job, exc: BaseException) -> None:
        # unacked: RabbitMQ delivers the range again once its channel is gone
        log.warning("range abandoned: broker unavailable", extra={"job": job.spec.job_id, "error": repr(exc)})

    def _release(self, job: Job) -> None:
        """A range of ``job`` is done with; the last one out of a drained job tears it
        down, in the background: the tear-down (the job's log upload) need not hold up
        the next job, whose announcement and set-up go on meanwhile."""
        job.in_flight -= 1
        if job.drained and job.in_flight == 0:
            self._in_background(self._leave(job))

    async def _leave(self, job: Job) -> None:
        try:
            await self._teardown(job)
        except Exception as exc:  # in the background: nobody else would hear of it
            log.error("job tear-down failed", extra={"job": job.spec.job_id, "error": repr(exc)})

    async def _next_range(self) -> tuple[Job, Delivery] | None:
        """The next range to run, or None once the worker is stopping."""
        while not self._stopping:
            for job in list(self.jobs.values()):
                if job.drained:
                    continue
                # counted before the get: a slot that finds the queue empty must not tear
                # the job down (closing its channel) under a range another slot just got
                job.in_flight += 1
                if job.queue.idle:  # no range at hand: the next comes once one is acked
                    self.reporter.hurry()
                try:
                    message = await job.queue.get()
                except BaseException:
                    job.in_flight -= 1
                    raise
                if message is None:
                    job.drained = True
                    self._release(job)
                    continue
                return job, message
            async with self._announcement_lock:
                if self._stopping or any(not j.drained for j in self.jobs.values()):
                    continue  # stopping, or another slot found a job while we waited for the lock
                self._looking = asyncio.current_task()
                try:
                    await self._take_announcement()
                finally:
                    self._looking = None
        return None

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
            job.drained = job.cancelled  # new work in a job we still hold
            if not job.drained:
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

    # -- a job's life -----------------------------------------------------------------

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
        job_log: JobLogFile | None = None
        # said at once: the control plane must not take a job nobody consumes during its
        # set-up for one whose worker died
        self._setting_up.add(spec.job_id)
        self.reporter.heartbeat(self._heartbeat())
        self.reporter.hurry()
        try:
            runner = runner_for(spec.payload)
            work_dir = self.work_dir / f"job-{spec.job_id}-{self.id.replace(':', '-')}"
            work_dir.mkdir(parents=True, exist_ok=True)
            job_log = JobLogFile(job_log_path(self.log_dir, spec.workflow_id, spec.job_id))
            if spec.payload.setup:
                await self._job_command(spec.payload.setup, "set-up", work_dir, job_log, fail=True)
            await queue.consume()  # only now: no range waits in our buffer during the set-up
        except BaseException:
            self._setting_up.discard(spec.job_id)
            if job_log is not None:
                job_log.close()
            await queue.close()
            raise
        self._setting_up.discard(spec.job_id)
        job = self.jobs[spec.job_id] = Job(spec, queue, runner, work_dir, job_log)
        self.reporter.heartbeat(self._heartbeat())
        # where the log is, for the monitor (known from set-up on: a worker may die later)
        self.reporter.report(logs=[JobLog(job_id=spec.job_id, path=str(job_log.path.resolve()))])
        self._invite(job)
        log.info("job set up", extra={"job": spec.job_id, "label": spec.label, "worker": self.id})

    def _invite(self, job: Job) -> None:
        """More ranges ready than we take at once: ask the control plane, once, to
        announce the job again so that an idle worker joins (with the next batch: an
        invitation lost with the broker only means nobody joins)."""
        if not job.invited and (job.queue.backlog or 0) > self.prefetch:
            job.invited = True
            self.reporter.invite(job.spec.job_id)

    async def _teardown(self, job: Job) -> None:
        if self.jobs.get(job.spec.job_id) is not job:
            return
        del self.jobs[job.spec.job_id]
        await job.queue.close(give_back=not job.cancelled)
        if job.spec.payload.teardown:
            await self._job_command(job.spec.payload.teardown, "tear-down", job.work_dir, job.log, fail=False)
        job.log.close()
        shutil.rmtree(job.work_dir, ignore_errors=True)
        self.reporter.heartbeat(self._heartbeat("stopping" if self._stopping else "live"))
        log.info("job torn down", extra={"job": job.spec.job_id, "events": job.events_done, "worker": self.id})

    async def _job_command(self, command: str, what: str, work_dir: Path, job_log: JobLogFile, *, fail: bool) -> None:
        """A job's set-up or tear-down command, its output in the job's log."""
        output = work_dir / f"{what}.out"
        outcome = await CommandRunner(PayloadSpec(command=command)).run("", output, work_dir)
        took = (outcome.ended_at - outcome.started_at).total_seconds()
        # when and where it ran: set-ups and uploads are what EventService amortizes
        job_log.append(
            command_header(what, storable(command, 500), self.id, outcome.started_at),
            output,
            command_footer(what, outcome.status, outcome.exit_code, outcome.ended_at, took),
        )
        job_log.flush()
        if fail and outcome.status != "finished":
            raise SetupFailed(f"job {what} failed: {outcome.error}")

    # -- running a range --------------------------------------------------------------

    async def _run_range(self, job: Job, message: Delivery) -> Ran | None:
        """Run a range's events; returns what ran, to be logged and reported before the
        range is acked (None: nothing left to do, the range is acked already)."""
        queue = job.queue.name
        try:
            rng = decode(message.body, EventRange)
        except MessageError as exc:
            return Ran(refused=[refused(message.body, queue, str(exc))])
        if rng.job_id != job.spec.job_id:
            reason = f"range of job {rng.job_id} in the queue of job {job.spec.job_id}"
            return Ran(refused=[refused(message.body, queue, reason)])
        if message.redelivered:
            # its holder was lost (or RabbitMQ restarted) before acking it: not run here.
            # The control plane charges an attempt for the events Postgres saw running
            # (and only those) and issues them again
            log.warning("range delivered again: returned to the control plane", extra={"job": job.spec.job_id})
            return Ran(finals=[self._status(job, e, "returned") for e in rng.events])
        ran = Ran()
        finals = ran.finals
        try:
            for i, event in enumerate(rng.events):
                if job.cancelled:
                    break
                if self._stopping:
                    ran.rest = list(rng.events[i:])
                    break
                if rng.confirm_start:  # came back once: its start must be on record first
                    running = self._status(job, event, "running", started_at=now())
                    await self.reporter.report([running])
                outcome = await self._run_event(job, event, confirmed=rng.confirm_start)
                if outcome is not None:
                    finals.append(Ended(event, outcome))
        except asyncio.CancelledError:
            # the grace period ran out mid-event: give the unfinished events back with their
            # attempt unchanged (a shutdown is not a failure of the payload)
            done = {f.event.number if isinstance(f, Ended) else f.number for f in finals}
            ran.rest = [e for e in rng.events if e.number not in done]
            # bounded: with the broker away the range stays unacked and comes back to the
            # control plane with the connection instead
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(GIVE_BACK_SECONDS):
                    await self._report_and_ack(job, message, ran)
            raise
        return ran

    async def _report_and_ack(self, job: Job, message: Delivery, ran: Ran) -> None:
        """Log the events that ran, give back the rest, send the statuses, and ack the
        range once they are safe in es.status."""
        finals: list[StatusUpdate] = []
        for f in ran.finals:
            if isinstance(f, Ended):
                self._log_event(job, f.event, f.outcome)
                f = self._update(job, f.event, f.outcome)
            finals.append(f)
        if not job.cancelled:  # a cancelled job's events are cancelled already
            finals += [self._status(job, e, "stopped") for e in ran.rest]
        events = len({u.number for u in finals if u.status in ("finished", "failed")})
        job.events_done += events
        self.events_done += events
        if finals or ran.refused:
            for r in ran.refused:
                log.warning("refused a range", extra={"job": job.spec.job_id, "reason": r.reason})
            await self.reporter.report(finals, refused=ran.refused)
        with contextlib.suppress(Exception):  # a job deleted meanwhile: nothing left to ack
            await job.queue.ack(message)

    def _status(
        self, job: Job, event: EventSpec, status: EventStatus, started_at: datetime | None = None
    ) -> StatusUpdate:
        """A status of an event that has no outcome (yet): running, returned, stopped.
        A range given back names its issue: a stale one reissues nothing."""
        issue = event.issue if status in ("returned", "stopped") else None
        return StatusUpdate(
            job_id=job.spec.job_id,
            number=event.number,
            attempt=event.attempt,
            status=status,
            worker=self.id,
            started_at=started_at,
            issue=issue,
        )

    async def _run_event(self, job: Job, event: EventSpec, *, confirmed: bool = False) -> Outcome | None:
        """Run one payload; None if its job was cancelled meanwhile. ``confirmed``: its
        'running' is on record already."""
        output = _output(job, event)
        if job.runner.inline:
            # a plain function blocks the loop while it runs: it cannot be interrupted, so
            # it needs no task, and its 'running' could not leave before it ended, so it
            # gets none (its final update carries its start)
            return await job.runner.run(event.payload, output, job.work_dir)
        # reported once the payload is under way (at the slot's next suspension): making
        # and queueing the update need not delay its start
        if not confirmed:
            asyncio.get_running_loop().call_soon(self._report_running, job, event, now())
        # the payload runs in the slot's own task (a task of its own cost two loop turns
        # per event); `dispatcher cancel` cancels the slot while it is in the payload
        slot = asyncio.current_task()
        assert slot is not None
        job.running.add(slot)
        try:
            outcome = await job.runner.run(event.payload, output, job.work_dir)
        except asyncio.CancelledError:
            # that cancellation (once, and of a cancelled job) is taken back; any other,
            # such as a shutdown's after its grace period, goes on
            if job.cancelled and slot.cancelling() == 1:
                slot.uncancel()
                self._log_event(job, event, None)
                return None  # `dispatcher cancel`: the event is already cancelled in the bookkeeping
            raise
        finally:
            job.running.discard(slot)
        return outcome

    def _report_running(self, job: Job, event: EventSpec, started: datetime) -> None:
        self.reporter.running(self._status(job, event, "running", started_at=started))

    def _update(self, job: Job, event: EventSpec, outcome: Outcome) -> StatusUpdate:
        """An attempt that ran: finished, or failed (the control plane decides what next)."""
        return StatusUpdate(
            job_id=job.spec.job_id,
            number=event.number,
            attempt=event.attempt,
            status=outcome.status,
            worker=self.id,
            started_at=outcome.started_at,
            ended_at=outcome.ended_at,
            exit_code=outcome.exit_code,
            error=outcome.error,
        )

    def _log_event(self, job: Job, event: EventSpec, outcome: Outcome | None) -> None:
        """The event's part of the job log, appended whole: a header, its output, a footer
        (None: cancelled). Written before its status is sent: a reported event is logged."""
        if outcome is None:
            status, exit_code, error, took = "cancelled", None, None, 0.0
        else:
            status, exit_code, error = outcome.status, outcome.exit_code, outcome.error
            took = (outcome.ended_at - outcome.started_at).total_seconds()
        output = Path(_output(job, event)) if outcome is None or outcome.output else None
        job.log.append(
            event_header(event.number, event.attempt, event.payload, self.id),
            output,
            event_footer(event.number, status, exit_code, took, error),
        )


class SetupFailed(Exception):
    """A job's set-up command failed: the job cannot run on this worker."""
