"""Running one event range: its events' payloads, their part of the job log, their
statuses, and the range's ack once those are safe.

A range the broker delivers again (its holder was lost) is not run but returned to the
control plane, which charges an attempt only for events Postgres saw running; events a
shutdown stops are reported 'stopped' and issued again at the same attempt; a range the
worker cannot take is reported with its reason, for es.dlq. The worker publishes
statuses and nothing else: what follows a failed attempt is the control plane's call.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from schemas.joblog import event_footer, event_header
from schemas.messages import EventRange, EventSpec, EventStatus, MessageError, Refused, StatusUpdate, decode
from schemas.text import storable
from transport.interface import Delivery
from workers.job import Job
from workers.payload import Outcome, now
from workers.reporter import StatusReporter

log = logging.getLogger(__name__)

# how long a worker stopping after its grace period waits to give back what it stopped
GIVE_BACK_SECONDS = 10.0


def refused(body: bytes, source: str, reason: str, setup_failed: int | None = None) -> Refused:
    """A message this worker cannot take, for the control plane to dead-letter."""
    body64 = base64.b64encode(body[:700_000]).decode()
    return Refused(source=source, reason=reason, body=body64, setup_failed=setup_failed)


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


async def _run(job: Job, event: EventSpec, output: str) -> Outcome:
    """The payload's outcome. An OSError from its files here (its output, its work dir:
    a full disk, say) fails this attempt: taken for a broker outage, the range used to be
    left unacked on a live channel, and its event 'running' for good."""
    started = now()
    try:
        return await job.runner.run(event.payload, output, job.work_dir)
    except OSError as exc:
        log.warning("payload could not run here", extra={"job": job.id, "event": event.number, "error": repr(exc)})
        return Outcome("failed", started, now(), None, storable(f"the worker could not run it: {exc!r}", 1000))


def _output(job: Job, event: EventSpec) -> str:
    """Where an event's payload writes its output, until it is appended to the job log."""
    return f"{job.work_dir}/event-{event.number}.out"


class RangeRunner:
    def __init__(self, worker: str, reporter: StatusReporter, *, stopping: Callable[[], bool]) -> None:
        self.worker = worker
        self.reporter = reporter
        self.stopping = stopping
        self.events_done = 0  # events that ran to an end (finished or failed), all jobs

    async def run(self, job: Job, message: Delivery) -> Ran:
        """Run a range's events; returns what ran, to be logged and reported before the
        range is acked (``conclude``). Cancelled (a shutdown's grace is over), it gives
        back what did not end, and the cancellation goes on."""
        queue = job.queue.name
        try:
            rng = decode(message.body, EventRange)
        except MessageError as exc:
            return Ran(refused=[refused(message.body, queue, str(exc))])
        if rng.job_id != job.id:
            reason = f"range of job {rng.job_id} in the queue of job {job.id}"
            return Ran(refused=[refused(message.body, queue, reason)])
        if message.redelivered:
            # its holder was lost (or the broker restarted) before acking it: not run here.
            # The control plane charges an attempt for the events Postgres saw running
            # (and only those) and issues them again
            log.warning("range delivered again: returned to the control plane", extra={"job": job.id})
            return Ran(finals=[self._status(job, e, "returned") for e in rng.events])
        ran = Ran()
        finals = ran.finals
        try:
            for i, event in enumerate(rng.events):
                if job.cancelled:
                    break
                if self.stopping():
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
                    await self.conclude(job, message, ran)
            raise
        return ran

    async def conclude(self, job: Job, message: Delivery, ran: Ran) -> None:
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
                log.warning("refused a range", extra={"job": job.id, "reason": r.reason})
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
            job_id=job.id,
            number=event.number,
            attempt=event.attempt,
            status=status,
            worker=self.worker,
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
            return await _run(job, event, output)
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
            outcome = await _run(job, event, output)
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
            job_id=job.id,
            number=event.number,
            attempt=event.attempt,
            status=outcome.status,
            worker=self.worker,
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
            event_header(event.number, event.attempt, event.payload, self.worker),
            output,
            event_footer(event.number, status, exit_code, took, error),
        )
