"""A job on one worker: set up once, held by the ranges that run, torn down by the last.

A ``Job`` counts its own holders. A slot takes a hold before it asks the job's queue
for a range, and the hold goes with the range until the range is reported and acked
(in the background, while the slot runs its next one). Once the job is drained (its
queue had nothing more for us, or it was cancelled) the last hold released starts the
tear-down, once: a slot that finds the queue empty never tears the job down (closing
its channel) under a range another slot has just got.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from schemas.joblog import command_footer, command_header
from schemas.messages import JobAnnouncement, PayloadSpec
from schemas.text import storable
from transport.interface import JobQueue
from transport.names import job_log_path
from workers.joblog import JobLogFile
from workers.payload import CommandRunner, Runner, runner_for

log = logging.getLogger(__name__)


class SetupFailed(Exception):
    """A job's set-up command failed: the job cannot run on this worker."""


class Hold:
    """One holder of a job (a range being taken, run or concluded). Released once, by
    ``release`` or at the end of a ``with`` block; ``pass_on`` hands it to another owner
    (the background task that concludes a range) without releasing it."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self.job.released()

    def pass_on(self) -> Hold:
        assert self._held, "a hold passed on after its release"
        self._held = False
        return Hold(self.job)

    def __enter__(self) -> Hold:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


@dataclass(eq=False)
class Job:
    """A job this worker has set up."""

    spec: JobAnnouncement
    queue: JobQueue
    runner: Runner
    work_dir: Path
    log: JobLogFile  # the job's one log, shared with its other workers
    on_drained: Callable[[Job], None]  # starts the tear-down, once
    cancelled: bool = False
    invited: bool = False
    events_done: int = 0
    running: set[asyncio.Task[Any]] = field(default_factory=set)  # slots inside a payload
    _drained: bool = False
    _holds: int = 0
    _leaving: bool = False

    @property
    def id(self) -> int:
        return self.spec.job_id

    @property
    def drained(self) -> bool:
        return self._drained

    @property
    def leaving(self) -> bool:
        """Its tear-down has started (its queue is being closed)."""
        return self._leaving

    def hold(self) -> Hold:
        self._holds += 1
        return Hold(self)

    def released(self) -> None:
        self._holds -= 1
        self._leave_if_done()

    def drain(self) -> None:
        """No more ranges for us: leave once the last holder is done."""
        self._drained = True
        self._leave_if_done()

    def reopen(self) -> bool:
        """New work was announced for this job while we still hold it: take ranges again
        (unless it was cancelled). Says whether it did."""
        if not self._leaving:
            self._drained = self.cancelled
        return not self._drained

    def cancel(self) -> None:
        """`dispatcher cancel`: stop its running payloads and take no more ranges."""
        self.cancelled = True
        for slot in self.running:
            slot.cancel()
        self.drain()

    def _leave_if_done(self) -> None:
        if self._drained and self._holds == 0 and not self._leaving:
            self._leaving = True
            self.on_drained(self)


async def set_up(
    spec: JobAnnouncement, queue: JobQueue, *, work_root: Path, log_dir: Path, worker: str,
    on_drained: Callable[[Job], None],
) -> Job:
    """The job's runner, work dir and log, and its set-up command; then its queue is
    consumed (only now: no range waits in our buffer during the set-up). On failure the
    log is closed and the queue given back; the caller says so."""
    job_log: JobLogFile | None = None
    try:
        runner = runner_for(spec.payload)
        # a directory of this set-up's own: the tear-down of an earlier set-up of the job
        # by this worker may still be removing its own (the job came back meanwhile)
        work_dir = work_root / f"job-{spec.job_id}-{worker.replace(':', '-')}-{uuid.uuid4().hex[:8]}"
        work_dir.mkdir(parents=True, exist_ok=True)
        job_log = JobLogFile(job_log_path(log_dir, spec.workflow_id, spec.job_id))
        if spec.payload.setup:
            await job_command(spec.payload.setup, "set-up", work_dir, job_log, worker=worker, fail=True)
        await queue.consume()
    except BaseException:
        if job_log is not None:
            job_log.close()
        await queue.close()
        raise
    return Job(spec, queue, runner, work_dir, job_log, on_drained)


async def tear_down(job: Job, *, worker: str) -> None:
    """Give back what the job's queue delivered and nobody ran (a cancelled job's is
    dropped), run its tear-down command, close its log, remove its work dir."""
    await job.queue.close(give_back=not job.cancelled)
    if job.spec.payload.teardown:
        await job_command(job.spec.payload.teardown, "tear-down", job.work_dir, job.log, worker=worker, fail=False)
    job.log.close()
    shutil.rmtree(job.work_dir, ignore_errors=True)


async def job_command(command: str, what: str, work_dir: Path, job_log: JobLogFile, *, worker: str, fail: bool) -> None:
    """A job's set-up or tear-down command, its output in the job's log."""
    output = work_dir / f"{what}.out"
    outcome = await CommandRunner(PayloadSpec(command=command)).run("", output, work_dir)
    took = (outcome.ended_at - outcome.started_at).total_seconds()
    # when and where it ran: set-ups and uploads are what EventService amortizes
    job_log.append(
        command_header(what, storable(command, 500), worker, outcome.started_at),
        output,
        command_footer(what, outcome.status, outcome.exit_code, outcome.ended_at, took),
    )
    job_log.flush()
    if fail and outcome.status != "finished":
        raise SetupFailed(f"job {what} failed: {outcome.error}")
