"""The PanDA pilot's calls, answered from our bookkeeping and job queues: the HTTP pull
adapter of the transport, beside the native workers' AMQP (``dispatcher.monitor.panda``
routes the calls here).

Leases, not unacked messages: a range the API takes off a job's queue is recorded in
Postgres as running under the job's pilot (the worker ``pilot:<job>``) before its message
is acked, so nothing waits unacked for an HTTP client (RabbitMQ's consumer_timeout would
kill it) and the broker may fail over under it. The pilot's calls are its heartbeat: a
pilot silent for longer than its lease is lost, and the watchdog charges and issues again
what it held, as for a native worker (one attempt charged, unlike a broker failover).
Its reports become status updates on es.status, so the bookkeeping, retries, dead
letters and the monitor are the same for pilots and native workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

from dispatcher.leases import PilotJob, pilot_of
from dispatcher.store import Store
from schemas.messages import EventRange, EventStatus, StatusBatch, StatusUpdate, encode
from schemas.panda import (
    SC_FAILED,
    SC_NO_JOBS,
    PandaError,
    PandaRange,
    RangeId,
    RangeReport,
    answer,
    form_id,
    parse_reports,
)
from schemas.text import storable
from transport.interface import Transport
from transport.outage import is_outage

log = logging.getLogger(__name__)

# how a pilot's report reads in our bookkeeping; 'transferring' (output on its way) is
# still running, and PanDA's cancelled/discarded are given up like a fatal failure
REPORTED: dict[str, EventStatus] = {
    "running": "running",
    "transferring": "running",
    "finished": "finished",
    "failed": "failed",
    "fatal": "fatal",
    "cancelled": "fatal",
    "discarded": "fatal",
}
FINAL_JOB_STATES = ("finished", "failed", "holding", "closed", "cancelled")
MAX_RANGES_PER_CALL = 10_000
GUID_NAMESPACE = uuid.UUID("6f1e0c55-0f3a-4f57-9a4e-2b1d2c7e5d10")


def pandarange(job: PilotJob, number: int, attempt: int) -> PandaRange:
    """One event as the pilot gets it. Rubin's fine-grained shape: the "file" is the label,
    and the pilot maps ``first + startEvent - 1`` (first = 0, the LFN's first field) to the
    event's payload through the label's mapping (``RUBIN_ES_MAP_FILE``)."""
    return PandaRange(
        eventRangeID=str(RangeId(job.task_id, job.id, number, attempt)),
        startEvent=number + 1,
        lastEvent=number + 1,
        LFN=f"000000:{job.label}:eventservice_0",
        GUID=str(uuid.uuid5(GUID_NAMESPACE, f"task:{job.task_id}")).upper(),
        scope=job.workflow,
    )


def returned(job_id: int, events: list[tuple[int, int, int]]) -> list[StatusUpdate]:
    """The pilot gives these (number, attempt, issue) back: Postgres decides what it costs."""
    return [
        StatusUpdate(job_id=job_id, number=n, attempt=a, status="returned", worker=pilot_of(job_id), issue=i)
        for n, a, i in events
    ]


class Pilots:
    """The calls of the pilots: one object, shared by every request."""

    def __init__(self, store: Store, broker: Transport, *, lease: float, wait: float, poll: float = 0.5) -> None:
        self.store = store
        self.broker = broker
        self.lease = lease  # seconds a pilot holds what it was handed after its last call
        self.wait = wait  # at most this long, getEventRanges waits for work that may come
        self.poll = poll

    # -- getJob, updateJob --------------------------------------------------------------

    async def get_job(self, form: Mapping[str, str]) -> dict[str, Any]:
        """The oldest job with events waiting that no pilot holds becomes this pilot's."""
        host = storable(form.get("node") or form.get("siteName") or "unknown", 200)
        job_id = await self.store.pilot_take_job(host, self.lease, 1)
        if job_id is None:
            return answer(SC_NO_JOBS, errorDialog="no jobs in PanDA: no job with events waiting")
        job = await self._job(job_id)
        log.info("pilot took a job", extra={"job": job.id, "host": host})
        return answer(**self.definition(job))

    def definition(self, job: PilotJob) -> dict[str, Any]:
        """The job as PanDA's job dispatcher describes one (the fields the pilot reads)."""
        transformation, _, params = (job.pilot_command or "").strip().partition(" ")
        return {
            "PandaID": job.id,
            "jobsetID": job.id,
            "taskID": job.task_id,
            "jobName": f"{job.workflow}.{job.label}.{job.id}",
            "jobDefinitionID": job.id,
            "attemptNr": 1,
            "eventService": "True",
            "coreCount": 1,
            "prodSourceLabel": "managed",
            "transformation": transformation,
            "jobPars": params.strip(),
            "swRelease": "",
            "homepackage": "",
            "cmtConfig": "",
            "inFiles": "",
            "outFiles": "",
            "logFile": "",
            "logGUID": "",
            "GUID": "",
            "scopeIn": "",
            "scopeOut": "",
            "scopeLog": "",
            "maxWalltime": 0,
            "nEvents": job.n_events,
        }

    async def update_job(self, form: Mapping[str, str], host: str) -> dict[str, Any]:
        """A pilot's heartbeat or its job's final state. A final state ends its lease:
        what it still runs is given back now (and charged), not when the lease runs out."""
        job_id = form_id(form, "jobId")
        assert job_id is not None
        job = await self._job(job_id)
        state = form.get("state", "")
        if state in FINAL_JOB_STATES:
            running = await self.store.pilot_stop(job.id)
            if running:
                log.warning("pilot ended its job holding events", extra={"job": job.id, "events": len(running)})
                await self._report(job.id, returned(job.id, running))
            return answer(command="NULL")
        await self.store.pilot_seen(job.id, host, self.lease)
        # a cancelled job tells its pilot to stop (PanDA's "tobekilled")
        return answer(command="NULL" if job.active else "tobekilled")

    # -- getEventRanges, checkEventsAvailability ---------------------------------------

    async def get_event_ranges(self, form: Mapping[str, str], host: str) -> dict[str, Any]:
        job = await self._named_job(form)
        wanted = min(form_id(form, "nRanges", required=False) or 1, MAX_RANGES_PER_CALL)
        if not job.active:
            return answer(eventRanges=[])  # ended or cancelled: nothing will come
        await self.store.pilot_seen(job.id, host, self.lease)
        deadline = time.monotonic() + self.wait
        handed: list[tuple[int, int]] = []
        while True:
            handed += await self._take(job, wanted - len(handed))
            if handed or time.monotonic() >= deadline:
                break
            # An empty answer ends the pilot's job: not while work may still come of it
            # (a retry in its delay, a range another worker holds and may lose). What the
            # pilot holds itself is not waited for: its reports queue behind this call.
            if not await self.store.pilot_more_may_come(job.id):
                break
            await asyncio.sleep(self.poll)
        if handed:
            log.info("ranges handed to a pilot", extra={"job": job.id, "events": len(handed)})
        return answer(eventRanges=[pandarange(job, n, a).model_dump() for n, a in handed])

    async def _take(self, job: PilotJob, wanted: int) -> list[tuple[int, int]]:
        """Up to ``wanted`` events off the job's queue, a whole range at a time (a range
        of several events may bring a few more), each leased before its message is acked."""
        queue = self.broker.names.job(job.id)
        handed: list[tuple[int, int]] = []
        while len(handed) < wanted:
            state = await self.broker.queue_state(queue)
            if state is None or state[0] == 0:
                break
            try:
                message = await self.broker.get(queue)
            except Exception as exc:  # the queue went between the look and the get, say
                if is_outage(exc):
                    raise
                log.warning("cannot take from a job queue", extra={"job": job.id, "error": repr(exc)})
                break
            if message is None:
                break
            rng = await self.broker.decode_or_dead_letter(message, EventRange, source=queue)
            if rng is None:
                continue
            if rng.job_id != job.id:
                await self.broker.dead_letter(message.body, f"range of job {rng.job_id} in queue {queue}", source=queue)
                await message.ack()
                continue
            events = [(e.number, e.attempt, e.issue) for e in rng.events]
            try:
                if message.redelivered:
                    # it came back from a worker whose connection was lost: Postgres
                    # decides what that cost (as a native worker returns such a range)
                    await self._report(job.id, returned(job.id, events))
                else:
                    handed += await self.store.pilot_lease(job.id, events)
            except BaseException as exc:
                # never left unacked on a channel that lives on: back to its queue now
                with contextlib.suppress(Exception):
                    await message.nack(requeue=True)
                if handed and isinstance(exc, Exception) and is_outage(exc):
                    return handed  # what is leased already goes to the pilot, not to its lease's end
                raise
            await message.ack()
        return handed

    async def check_events_availability(self, form: Mapping[str, str]) -> dict[str, Any]:
        job = await self._named_job(form)
        return answer(nEventRanges=await self.store.pilot_available(job.id) if job.active else 0)

    # -- updateEventRanges -------------------------------------------------------------

    async def update_event_ranges(self, form: Mapping[str, str], host: str) -> dict[str, Any]:
        """The pilot's reports, all checked before any is taken: one that names no event
        of ours, or names several jobs, refuses the whole request. A report of an attempt
        the pilot does not hold (stale: charged and issued again since) is answered false
        and changes nothing."""
        given = form.get("version") or "0"
        if given not in ("0", "1", "2"):
            raise PandaError(SC_FAILED, f"version {given[:20]!r}: 0, 1 or 2")
        version = int(given)
        reports = parse_reports(form.get("eventRanges"), version)
        ids = [RangeId.parse(r.eventRangeID) for r in reports]
        jobs = {i.job_id for i in ids}
        if len(jobs) > 1:
            raise PandaError(SC_FAILED, f"eventRanges name several PandaIDs ({', '.join(map(str, sorted(jobs)))})")
        if not ids:
            return self._returns(version, [])
        job = await self._job(ids[0].job_id)
        wrong = [str(i) for i in ids if i.task_id != job.task_id]
        if wrong:
            raise PandaError(SC_FAILED, f"eventRangeID {wrong[0]}: job {job.id} is of task {job.task_id}")
        await self.store.pilot_seen(job.id, host, self.lease)
        held = await self.store.pilot_holds(job.id, [(i.number, i.attempt) for i in ids])
        now = datetime.now(UTC)
        updates = [
            self._update(job, i, r, now) for i, r in zip(ids, reports, strict=True) if (i.number, i.attempt) in held
        ]
        if updates:
            await self._report(job.id, updates)
        return self._returns(version, [(i.number, i.attempt) in held for i in ids])

    @staticmethod
    def _update(job: PilotJob, rid: RangeId, report: RangeReport, now: datetime) -> StatusUpdate:
        status = REPORTED[report.eventStatus]
        error = None
        if status in ("failed", "fatal"):
            error = storable(
                f"pilot reported {report.eventStatus}"
                + (f" (error {report.errorCode})" if report.errorCode is not None else "")
                + (f": {report.errorDiag}" if report.errorDiag else ""),
                2000,
            )
        return StatusUpdate(
            job_id=job.id,
            number=rid.number,
            attempt=rid.attempt,
            status=status,
            worker=pilot_of(job.id),
            ended_at=None if status == "running" else now,
            exit_code=report.errorCode if status in ("failed", "fatal") else (0 if status == "finished" else None),
            error=error,
        )

    @staticmethod
    def _returns(version: int, accepted: list[bool]) -> dict[str, Any]:
        # PanDA answers version 0 with JSON text in these fields, later versions with JSON
        if version == 0:
            return answer(Returns=orjson.dumps(accepted).decode(), Command=orjson.dumps({}).decode())
        return answer(Returns=accepted, Command={})

    # -- common ------------------------------------------------------------------------

    async def _report(self, job_id: int, updates: list[StatusUpdate]) -> None:
        """Into the bookkeeping as a worker's statuses would go (confirmed by RabbitMQ)."""
        await self.broker.publish_status(encode(StatusBatch(worker=pilot_of(job_id), updates=updates)))

    async def _named_job(self, form: Mapping[str, str]) -> PilotJob:
        """The job getEventRanges and checkEventsAvailability name, its ids checked."""
        job_id = form_id(form, "pandaID")
        assert job_id is not None
        job = await self._job(job_id)
        jobset = form_id(form, "jobsetID", required=False)
        if jobset is not None and jobset != job.id:
            raise PandaError(SC_FAILED, f"jobsetID {jobset}: job {job.id} is its own jobset")
        task = form_id(form, "taskID", required=False)
        if task is not None and task != job.task_id:
            raise PandaError(SC_FAILED, f"taskID {task}: job {job.id} is of task {job.task_id}")
        return job

    async def _job(self, job_id: int) -> PilotJob:
        job = await self.store.pilot_job(job_id)
        if job is None:
            raise PandaError(SC_FAILED, f"PandaID {job_id}: no such job")
        return job
