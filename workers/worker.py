"""The worker loop: get job -> set up once -> take event ranges until the job has none
left -> run each payload -> report -> ack -> tear down -> write one log for the job.

Every slot runs one event range at a time (``--slots N``: up to N events at once). A
worker consumes a job's queue with a bounded prefetch (``--prefetch``, default one range
per slot), so it never hides more than that from other workers. A slot does not wait
for the confirm of its statuses: the range is acked in the background once they are safe
in es.status. A larger prefetch keeps slots busy between a range's end and its ack (for
payloads of a few milliseconds it is worth it), but a worker that dies then charges an
attempt to the ranges it held without having started them. A job is
found through an announcement on es.jobs, taken only while a slot is free; when a worker
takes a job that has more ranges than it takes at once, it passes the announcement on so
idle workers join.

A failed event is retried alone: its next attempt goes into a delay queue (with the job's
announcement, so that a worker comes back for it), or, out of attempts, to es.dlq.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import random
import shutil
import socket
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from aio_pika.abc import AbstractIncomingMessage

from dispatcher.broker import DELIVERIES_HEADER, MAX_REDELIVERIES, Announcements, Broker, Delivery, JobQueue
from dispatcher.retry import TRANSIENT
from schemas.messages import (
    CancelJobs,
    DeadLetter,
    EventRange,
    EventSpec,
    EventStatus,
    Heartbeat,
    JobAnnouncement,
    JobLog,
    MessageError,
    PayloadSpec,
    StatusUpdate,
    decode,
    encode,
)
from workers.payload import CommandRunner, Outcome, Runner, now, runner_for
from workers.reporter import StatusReporter

log = logging.getLogger(__name__)

MAX_RETRY_DELAY = 512.0  # seconds: the longest delay step


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _deliveries(message: Delivery) -> int:
    """How many times the range was lost with a worker (see dispatcher.broker)."""
    count = message.headers.get(DELIVERIES_HEADER, 0)
    return count if isinstance(count, int) else 0


def retry_delay(base: float, attempt: int) -> float:
    """Exponential backoff with jitter: base x 2^(attempt-1), +-25 %."""
    return float(min(base * 2 ** (attempt - 1), MAX_RETRY_DELAY) * random.uniform(0.75, 1.25))


@dataclass
class Job:
    """A job this worker has set up."""

    spec: JobAnnouncement
    queue: JobQueue
    runner: Runner
    work_dir: Path
    segment: Path  # this worker's part of the job log
    log: BinaryIO  # ... open for appending while the job is held
    drained: bool = False
    cancelled: bool = False
    in_flight: int = 0
    invited: bool = False
    events_done: int = 0
    running: set[asyncio.Task[Any]] = field(default_factory=set)  # slots inside a payload


@dataclass(frozen=True)
class Ended:
    """An event whose payload ended, not yet settled (finished, retried or dead-lettered)."""

    event: EventSpec
    attempt: int
    outcome: Outcome


@dataclass
class Ran:
    """What running a range left to do: report its events (updates already made, such as
    lost attempts, and ended payloads to settle) and give back the rest (unstarted, or
    stopped by a shutdown), keeping the range's count of lost deliveries."""

    redeliveries: int
    finals: list[StatusUpdate | Ended] = field(default_factory=list)
    rest: list[EventSpec] = field(default_factory=list)


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
        self.jobs: dict[int, Job] = {}
        self.events_done = 0
        self.started_at = now()
        self._announcement_lock = asyncio.Lock()
        self._announcements: Announcements | None = None
        self._stopping = False
        self._looking: asyncio.Task[object] | None = None  # the slot waiting for an announcement
        # acks waiting for their statuses' confirm, and consumers being stopped
        self._background: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        """Serve jobs until ``stop`` is set; then take no new range, let running events
        finish for ``grace`` seconds, give back what did not run, and return."""
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

    # -- heartbeats and control -------------------------------------------------------

    def _heartbeat(self, state: str = "live") -> Heartbeat:
        return Heartbeat(
            host=socket.gethostname(),
            pid=os.getpid(),
            slots=self.slots,
            state=state,  # type: ignore[arg-type]
            jobs=sorted(self.jobs),
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
            except TRANSIENT as exc:  # the broker is away: the robust connection comes back
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
            except TRANSIENT as exc:
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
        except TRANSIENT as exc:
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
        spec = await self.broker.decode_or_dead_letter(message, JobAnnouncement, source=self.names.jobs)
        if spec is None:
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
                # cannot run this job here (e.g. its payload function does not import)
                log.error("job set-up failed", extra={"job": spec.job_id, "error": repr(exc)})
                await self.broker.dead_letter(message.body, f"set-up failed: {exc!r}", source=self.names.jobs)
        await message.ack()

    # -- a job's life -----------------------------------------------------------------

    async def _setup(self, spec: JobAnnouncement) -> None:
        queue = await self.broker.open_job(spec.queue, prefetch=self.prefetch, consume=False)
        if queue.backlog is None:
            # an announcement of a job that ended (its queue is deleted), passed on or
            # sent again: setting it up would cost its set-up command for nothing. (With
            # nothing ready but the queue there, it is set up: a retry's range may reach
            # the queue a moment after its announcement reached es.jobs.)
            await queue.close()
            log.debug("announced job has ended: not set up", extra={"job": spec.job_id})
            return
        job_log: BinaryIO | None = None
        try:
            runner = runner_for(spec.payload)
            work_dir = self.work_dir / f"job-{spec.job_id}-{self.id.replace(':', '-')}"
            work_dir.mkdir(parents=True, exist_ok=True)
            segment = work_dir / "job.log"
            job_log = segment.open("ab")
            if spec.payload.setup:
                await self._job_command(spec.payload.setup, "set-up", work_dir, job_log, fail=True)
            await queue.consume()  # only now: no range waits in our buffer during the set-up
        except BaseException:
            if job_log is not None:
                job_log.close()
            await queue.close()
            raise
        job = self.jobs[spec.job_id] = Job(spec, queue, runner, work_dir, segment, job_log)
        self.reporter.heartbeat(self._heartbeat())
        self._invite(job)
        log.info("job set up", extra={"job": spec.job_id, "label": spec.label, "worker": self.id})

    def _invite(self, job: Job) -> None:
        """More ranges ready than we take at once: pass the announcement on, once, so
        that an idle worker joins. In the background: the slots need not wait for its
        confirm, and an invitation lost with the broker only means nobody joins."""
        if not job.invited and (job.queue.backlog or 0) > self.prefetch:
            job.invited = True
            self._in_background(self._pass_on(job.spec))

    async def _pass_on(self, spec: JobAnnouncement) -> None:
        try:
            await self.broker.publish(self.names.jobs, encode(spec))
        except TRANSIENT as exc:
            log.warning("job not passed on: broker unavailable", extra={"job": spec.job_id, "error": repr(exc)})

    async def _teardown(self, job: Job) -> None:
        if self.jobs.get(job.spec.job_id) is not job:
            return
        del self.jobs[job.spec.job_id]
        await job.queue.close(give_back=not job.cancelled)
        if job.spec.payload.teardown:
            await self._job_command(job.spec.payload.teardown, "tear-down", job.work_dir, job.log, fail=False)
        job.log.close()
        logs = []
        if job.segment.exists():
            logs.append(JobLog(job_id=job.spec.job_id, path=str(self._append_log(job).resolve())))
        shutil.rmtree(job.work_dir, ignore_errors=True)
        self.reporter.heartbeat(self._heartbeat("stopping" if self._stopping else "live"))
        if logs:
            self.reporter.report(logs=logs)  # sent with the next batch: the next job need not wait
        log.info("job torn down", extra={"job": job.spec.job_id, "events": job.events_done, "worker": self.id})

    async def _job_command(self, command: str, what: str, work_dir: Path, job_log: BinaryIO, *, fail: bool) -> None:
        """A job's set-up or tear-down command, its output in the job's log."""
        output = work_dir / f"{what}.out"
        outcome = await CommandRunner(PayloadSpec(command=command)).run("", output, work_dir)
        # when and where it ran: set-ups and uploads are what EventService amortizes
        job_log.write(f"=== job {what}: {command} worker {self.id} at {outcome.started_at.isoformat()}\n".encode())
        if output.exists():
            job_log.write(output.read_bytes())
            output.unlink()
        took = (outcome.ended_at - outcome.started_at).total_seconds()
        job_log.write(
            f"=== job {what} {outcome.status} exit_code={outcome.exit_code} at {outcome.ended_at.isoformat()} "
            f"duration={took:.3f}s\n".encode()
        )
        job_log.flush()
        if fail and outcome.status != "finished":
            raise RuntimeError(f"job {what} failed: {outcome.error}")

    def _append_log(self, job: Job) -> Path:
        """One log file per job: every worker of the job appends its part, whole, under a lock."""
        path = self.log_dir / f"workflow-{job.spec.workflow_id}" / f"job-{job.spec.job_id}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as out, job.segment.open("rb") as part:
            fcntl.flock(out, fcntl.LOCK_EX)
            shutil.copyfileobj(part, out)
        return path

    # -- running a range --------------------------------------------------------------

    async def _run_range(self, job: Job, message: Delivery) -> Ran | None:
        """Run a range's events; returns what ran, to be settled and reported before the
        range is acked (None: nothing left to do, the range is acked already)."""
        if message.redelivered:
            # its worker died (or RabbitMQ restarted) before acking it: count that in the
            # range itself, so that a range that keeps killing workers is recognised
            deliveries = _deliveries(message) + 1
            await self.broker.publish(job.spec.queue, message.body, headers={DELIVERIES_HEADER: deliveries})
            await job.queue.ack(message)
            log.warning(
                "range delivered again after its worker was lost: counted as a new attempt",
                extra={"job": job.spec.job_id, "deliveries": deliveries},
            )
            return None
        rng = await self.broker.decode_or_dead_letter(message, EventRange, source=job.spec.queue, ack=job.queue.ack)
        if rng is None:
            return None
        if rng.job_id != job.spec.job_id:
            await self.broker.dead_letter(
                message.body, f"range of job {rng.job_id} in the queue of job {job.spec.job_id}", source=job.spec.queue
            )
            await job.queue.ack(message)
            return None
        # a range redelivered after a worker died counts as a new attempt of its events
        redeliveries = _deliveries(message)
        ran = Ran(redeliveries)
        finals = ran.finals
        try:
            for i, event in enumerate(rng.events):
                if job.cancelled:
                    break
                if self._stopping:
                    ran.rest = list(rng.events[i:])
                    break
                attempt = event.attempt + redeliveries
                if attempt > event.attempt:
                    # the attempts lost with their workers, recorded as failed and retried (the
                    # range may never have started there: without them attempts would have a gap)
                    finals.extend(self._lost_attempts(job, event, attempt))
                if redeliveries >= MAX_REDELIVERIES:
                    finals.append(
                        await self._give_up(
                            job,
                            event,
                            attempt,
                            now(),
                            None,
                            f"the range was delivered {redeliveries + 1} times: it keeps killing workers",
                        )
                    )
                    continue
                outcome = await self._run_event(job, event, attempt)
                if outcome is not None:
                    finals.append(Ended(event, attempt, outcome))
        except asyncio.CancelledError:
            # the grace period ran out mid-event: give the unfinished events back with their
            # attempt unchanged (a shutdown is not a failure of the payload)
            done = {f.event.number if isinstance(f, Ended) else f.number for f in finals}
            ran.rest = [e for e in rng.events if e.number not in done]
            await self._report_and_ack(job, message, ran)
            raise
        return ran

    async def _report_and_ack(self, job: Job, message: Delivery, ran: Ran) -> None:
        """Log and settle the events that ran, give back the rest, send the statuses, and
        ack the range once they are safe in es.status."""
        finals: list[StatusUpdate] = []
        for f in ran.finals:
            if isinstance(f, Ended):
                self._log_event(job, f.event, f.attempt, f.outcome)
                f = await self._settle(job, f.event, f.attempt, f.outcome)
            finals.append(f)
        await self._finish_range(job, finals, ran.rest, ran.redeliveries)
        with contextlib.suppress(Exception):  # a job deleted meanwhile: nothing left to ack
            await job.queue.ack(message)

    async def _run_event(self, job: Job, event: EventSpec, attempt: int) -> Outcome | None:
        """Run one payload; None if its job was cancelled meanwhile."""
        output = _output(job, event)
        if job.runner.inline:
            # a plain function blocks the loop while it runs: it cannot be interrupted, so
            # it needs no task, and its 'running' could not leave before it ended, so it
            # gets none (its final update carries its start)
            return await job.runner.run(event.payload, output, job.work_dir)
        # reported once the payload is under way (at the slot's next suspension): making
        # and queueing the update need not delay its start
        asyncio.get_running_loop().call_soon(self._report_running, job, event, attempt, now())
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
                self._log_event(job, event, attempt, None)
                return None  # `dispatcher cancel`: the event is already cancelled in the bookkeeping
            raise
        finally:
            job.running.discard(slot)
        return outcome

    def _report_running(self, job: Job, event: EventSpec, attempt: int, started: datetime) -> None:
        self.reporter.running(
            StatusUpdate(
                job_id=job.spec.job_id,
                number=event.number,
                attempt=attempt,
                status="running",
                worker=self.id,
                started_at=started,
            )
        )

    async def _settle(self, job: Job, event: EventSpec, attempt: int, outcome: Outcome) -> StatusUpdate:
        """A finished event, a retry scheduled, or a dead letter: never silence."""
        if outcome.status == "failed":
            if attempt < job.spec.max_attempts:
                delay = retry_delay(job.spec.retry_delay, attempt)
                retry = EventRange(
                    workflow_id=job.spec.workflow_id,
                    job_id=job.spec.job_id,
                    events=[EventSpec(number=event.number, payload=event.payload, attempt=attempt + 1)],
                )
                await self.broker.publish_delayed(job.spec.queue, encode(retry), delay)
                # the announcement lands right behind the retry: a worker comes back for it
                await self.broker.publish_delayed(self.names.jobs, encode(job.spec), delay)
                log.info(
                    "event retry scheduled",
                    extra={"job": job.spec.job_id, "event": event.number, "attempt": attempt, "delay": round(delay, 2)},
                )
                return self._update(job, event, attempt, outcome, "retrying")
            return await self._give_up(
                job, event, attempt, outcome.started_at, outcome.exit_code, outcome.error, ended_at=outcome.ended_at
            )
        return self._update(job, event, attempt, outcome, "finished")

    def _lost_attempts(self, job: Job, event: EventSpec, attempt: int) -> list[StatusUpdate]:
        """The attempts before ``attempt`` that the range's redeliveries charged. 'retrying'
        never moves an event already further along, nor an attempt that did end."""
        return [
            StatusUpdate(
                job_id=job.spec.job_id,
                number=event.number,
                attempt=lost,
                status="retrying",
                worker=self.id,
                ended_at=now(),
                error="lost with its worker (the range was delivered again)",
            )
            for lost in range(event.attempt, attempt)
        ]

    def _update(self, job: Job, event: EventSpec, attempt: int, outcome: Outcome, status: EventStatus) -> StatusUpdate:
        return StatusUpdate(
            job_id=job.spec.job_id,
            number=event.number,
            attempt=attempt,
            status=status,
            worker=self.id,
            started_at=outcome.started_at,
            ended_at=outcome.ended_at,
            exit_code=outcome.exit_code,
            error=outcome.error,
        )

    async def _give_up(
        self,
        job: Job,
        event: EventSpec,
        attempt: int,
        started: datetime,
        exit_code: int | None,
        error: str | None,
        ended_at: datetime | None = None,
    ) -> StatusUpdate:
        dead = DeadLetter(
            workflow_id=job.spec.workflow_id,
            job_id=job.spec.job_id,
            label=job.spec.label,
            number=event.number,
            payload=event.payload,
            attempts=attempt,
            error=error,
            worker=self.id,
            at=now(),
        )
        await self.broker.publish(self.names.dlq, encode(dead), headers={"x-reason": (error or "failed")[:1000]})
        log.warning(
            "event out of attempts: dead-lettered",
            extra={"job": job.spec.job_id, "event": event.number, "attempts": attempt},
        )
        return StatusUpdate(
            job_id=job.spec.job_id,
            number=event.number,
            attempt=attempt,
            status="failed",
            worker=self.id,
            started_at=started,
            ended_at=ended_at or now(),
            exit_code=exit_code,
            error=error,
        )

    async def _finish_range(
        self, job: Job, finals: list[StatusUpdate], rest: list[EventSpec], redeliveries: int
    ) -> None:
        """Give back what did not run (keeping the range's count of lost deliveries) and
        send the statuses; returns once they are safe in es.status (confirmed)."""
        if rest and not job.cancelled:
            back = EventRange(workflow_id=job.spec.workflow_id, job_id=job.spec.job_id, events=rest)
            headers = {DELIVERIES_HEADER: redeliveries} if redeliveries else None
            with contextlib.suppress(Exception):  # the job's queue is gone: nothing to give back to
                await self.broker.publish(job.spec.queue, encode(back), headers=headers)
                await self.broker.publish(self.names.jobs, encode(job.spec))
        events = len({u.number for u in finals})  # a given-up event may carry its lost attempts
        job.events_done += events
        self.events_done += events
        if finals:
            await self.reporter.report(finals)

    def _log_event(self, job: Job, event: EventSpec, attempt: int, outcome: Outcome | None) -> None:
        """The event's part of the job log: a header, its output, a footer (None: cancelled)."""
        if outcome is None:
            status, exit_code, error, took = "cancelled", None, None, 0.0
        else:
            status, exit_code, error = outcome.status, outcome.exit_code, outcome.error
            took = (outcome.ended_at - outcome.started_at).total_seconds()
        header = f"=== event {event.number} attempt {attempt} payload {event.payload!r} worker {self.id}\n"
        footer = f"=== event {event.number} {status} exit_code={exit_code} duration={took:.3f}s" + (
            f" error={error.splitlines()[0][:200]!r}\n" if error else "\n"
        )
        # written whole, with no await in between: slots never interleave in the log
        if outcome is not None and not outcome.output:
            job.log.write(f"{header}{footer}".encode())  # nothing in between: one write
            return
        job.log.write(header.encode())
        output = _output(job, event)
        with contextlib.suppress(FileNotFoundError), open(output, "rb") as out:
            shutil.copyfileobj(out, job.log)
            os.unlink(output)
        job.log.write(footer.encode())
