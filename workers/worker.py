"""The worker loop: get job -> set up once -> take event ranges until the job has none
left -> run each payload -> report -> ack -> tear down -> write one log for the job.

Every slot runs one event range at a time (``--slots N``: up to N events at once). A
worker holds only the ranges it is running (basic.get, never a long-lived prefetch), so a
slow payload never hides work from other workers. A job is found through an announcement
on es.jobs, taken only while a slot is free; when a worker takes a job that has more
ranges than it takes at once, it passes the announcement on so idle workers join.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from aio_pika.abc import AbstractIncomingMessage

from dispatcher.broker import Announcements, Broker, JobQueue
from schemas.messages import (
    EventRange,
    JobAnnouncement,
    JobLog,
    MessageError,
    StatusUpdate,
    decode,
    encode,
)
from workers.payload import Runner, now, runner_for
from workers.reporter import StatusReporter

log = logging.getLogger(__name__)


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass
class Job:
    """A job this worker has set up."""

    spec: JobAnnouncement
    queue: JobQueue
    runner: Runner
    work_dir: Path
    segment: Path  # this worker's part of the job log
    drained: bool = False
    in_flight: int = 0
    invited: bool = False
    events_done: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Worker:
    def __init__(
        self,
        broker: Broker,
        *,
        slots: int = 1,
        work_dir: Path,
        log_dir: Path,
        worker_id: str | None = None,
    ) -> None:
        self.broker = broker
        self.slots = slots
        self.work_dir = work_dir
        self.log_dir = log_dir
        self.id = worker_id or new_worker_id()
        self.reporter = StatusReporter(broker, self.id)
        self.jobs: dict[int, Job] = {}
        self.events_done = 0
        self._announcement_lock = asyncio.Lock()
        self._announcements: Announcements | None = None
        self._stopping = False

    async def run(self, stop: asyncio.Event) -> None:
        self._announcements = await self.broker.announcements()
        reporter = asyncio.create_task(self.reporter.run(), name="reporter")
        slots = [asyncio.create_task(self._slot(), name=f"slot-{i}") for i in range(self.slots)]
        log.info("worker started", extra={"worker": self.id, "slots": self.slots})
        stopper = asyncio.create_task(stop.wait())
        # a slot or the reporter that ends by itself has failed: stop rather than hang
        await asyncio.wait([stopper, reporter, *slots], return_when=asyncio.FIRST_COMPLETED)
        self._stopping = True
        for slot in slots:
            slot.cancel()
        for slot in slots:
            with contextlib.suppress(asyncio.CancelledError):
                await slot
        for job in list(self.jobs.values()):
            await self._teardown(job)
        if not reporter.done():
            await self.reporter.flush()
            reporter.cancel()
        stopper.cancel()
        for task in [reporter, *slots]:
            with contextlib.suppress(asyncio.CancelledError):
                if task.exception():
                    raise task.exception()  # type: ignore[misc]
        log.info("worker stopped", extra={"worker": self.id, "events": self.events_done})

    # -- finding work -----------------------------------------------------------------

    async def _slot(self) -> None:
        while not self._stopping:
            job, message = await self._next_range()
            try:
                await self._run_range(job, message)
            finally:
                job.in_flight -= 1
                if job.drained and job.in_flight == 0:
                    await self._teardown(job)

    async def _next_range(self) -> tuple[Job, AbstractIncomingMessage]:
        while True:
            for job in list(self.jobs.values()):
                if job.drained:
                    continue
                message = await job.queue.get()
                if message is None:
                    job.drained = True
                    if job.in_flight == 0:
                        await self._teardown(job)
                    continue
                job.in_flight += 1
                if not job.invited and (message.message_count or 0) > 0:
                    job.invited = True  # more ranges than we take at once: let an idle worker join
                    await self.broker.publish(self.broker.names.jobs, encode(job.spec))
                return job, message
            async with self._announcement_lock:
                if any(not j.drained for j in self.jobs.values()):
                    continue  # another slot found a job while we waited for the lock
                await self._take_announcement()

    async def _take_announcement(self) -> None:
        assert self._announcements is not None
        message = await self._announcements.next()
        try:
            spec = decode(message.body, JobAnnouncement)
        except MessageError as exc:
            await self.broker.dead_letter(message.body, str(exc), source=self.broker.names.jobs)
            await message.ack()
            return
        job = self.jobs.get(spec.job_id)
        if job is not None:
            job.drained = False  # new work in a job we still hold
        else:
            try:
                await self._setup(spec)
            except Exception as exc:
                # cannot run this job here (e.g. its payload function does not import)
                log.error("job set-up failed", extra={"job": spec.job_id, "error": repr(exc)})
                await self.broker.dead_letter(message.body, f"set-up failed: {exc!r}", source=self.broker.names.jobs)
        await message.ack()

    # -- a job's life -----------------------------------------------------------------

    async def _setup(self, spec: JobAnnouncement) -> None:
        runner = runner_for(spec.payload)
        work_dir = self.work_dir / f"job-{spec.job_id}-{self.id.replace(':', '-')}"
        work_dir.mkdir(parents=True, exist_ok=True)
        queue = await self.broker.open_job(spec.queue)
        self.jobs[spec.job_id] = Job(spec, queue, runner, work_dir, work_dir / "job.log")
        log.info("job set up", extra={"job": spec.job_id, "label": spec.label, "worker": self.id})

    async def _teardown(self, job: Job) -> None:
        if self.jobs.get(job.spec.job_id) is not job:
            return
        del self.jobs[job.spec.job_id]
        await job.queue.close()
        logs = []
        if job.segment.exists():
            logs.append(JobLog(job_id=job.spec.job_id, path=str(self._append_log(job).resolve())))
        shutil.rmtree(job.work_dir, ignore_errors=True)
        if logs:
            await self.reporter.report(logs=logs)
        log.info("job torn down", extra={"job": job.spec.job_id, "events": job.events_done, "worker": self.id})

    def _append_log(self, job: Job) -> Path:
        """One log file per job: every worker of the job appends its part, whole, under a lock."""
        path = self.log_dir / f"workflow-{job.spec.workflow_id}" / f"job-{job.spec.job_id}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as out, job.segment.open("rb") as part:
            fcntl.flock(out, fcntl.LOCK_EX)
            shutil.copyfileobj(part, out)
        return path

    async def _run_range(self, job: Job, message: AbstractIncomingMessage) -> None:
        try:
            rng = decode(message.body, EventRange)
            if rng.job_id != job.spec.job_id:
                raise MessageError(f"range of job {rng.job_id} in the queue of job {job.spec.job_id}")
        except MessageError as exc:
            await self.broker.dead_letter(message.body, str(exc), source=job.spec.queue)
            await message.ack()
            return
        # a range redelivered after a worker died counts as a new attempt of its events
        count = (message.headers or {}).get("x-delivery-count", 0)
        redeliveries = count if isinstance(count, int) else 0
        finals = []
        for event in rng.events:
            attempt = event.attempt + redeliveries
            started = now()
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
            output = job.work_dir / f"event-{event.number}.out"
            outcome = await job.runner.run(event.payload, output, job.work_dir)
            await self._log_event(
                job,
                event.number,
                event.payload,
                attempt,
                output,
                outcome.status,
                outcome.exit_code,
                outcome.error,
                outcome.ended_at - outcome.started_at,
            )
            finals.append(
                StatusUpdate(
                    job_id=job.spec.job_id,
                    number=event.number,
                    attempt=attempt,
                    status=outcome.status,
                    worker=self.id,
                    started_at=outcome.started_at,
                    ended_at=outcome.ended_at,
                    exit_code=outcome.exit_code,
                    error=outcome.error,
                )
            )
        await self.reporter.report(finals)  # confirmed in es.status before the range is acked
        with contextlib.suppress(Exception):  # a job deleted meanwhile: nothing left to ack
            await message.ack()
        job.events_done += len(finals)
        self.events_done += len(finals)

    async def _log_event(
        self,
        job: Job,
        number: int,
        payload: str,
        attempt: int,
        output: Path,
        status: str,
        exit_code: int | None,
        error: str | None,
        took: object,
    ) -> None:
        header = f"=== event {number} attempt {attempt} payload {payload!r} worker {self.id}\n"
        footer = f"=== event {number} {status} exit_code={exit_code} duration={took}" + (
            f" error={error.splitlines()[0][:200]!r}\n" if error else "\n"
        )
        async with job.lock:
            with job.segment.open("ab") as seg:
                seg.write(header.encode())
                if output.exists():
                    with output.open("rb") as out:
                        shutil.copyfileobj(out, seg)
                    output.unlink()
                seg.write(footer.encode())
