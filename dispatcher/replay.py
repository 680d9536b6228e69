"""``dispatcher replay``: events out of the dead-letter queue back into their jobs, and
``dispatcher cancel``.

Replay takes the DLQ's messages one at a time and holds them unacked while it works; a
dead letter only selects an event: its payload and its attempts come from Postgres (a
dead letter is a message, and a message is never trusted to say what runs);
a dead letter leaves the DLQ only after its event was given a fresh attempt in Postgres
and its range was republished (confirmed). The rest go back to the DLQ untouched. A
dead letter whose event has moved on since (replayed already) is dropped, so running
replay twice does not run an event twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from dispatcher.releaser import Releaser
from dispatcher.store import Store
from schemas.messages import CancelJobs, DeadLetter, EventRange, EventSpec, MessageError, decode, encode
from transport.interface import REFUSED_BY_HEADER, Incoming, Transport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Selector:
    workflow: int | None = None
    task: str | None = None
    job: int | None = None
    event: int | None = None
    reason: str | None = None  # a substring of the last error

    def matches(self, dead: DeadLetter) -> bool:
        return (
            (self.workflow is None or dead.workflow_id == self.workflow)
            and (self.task is None or dead.label == self.task)
            and (self.job is None or dead.job_id == self.job)
            and (self.event is None or dead.number == self.event)
            and (self.reason is None or self.reason.lower() in (dead.error or "").lower())
        )


@dataclass(frozen=True)
class Outcome:
    dead: DeadLetter
    action: str  # replayed | would replay | skipped: <why> | dropped: <why>

    def describe(self) -> str:
        d = self.dead
        error = (d.error or "").splitlines()[0][:80] if d.error else ""
        return (
            f"{self.action}: workflow {d.workflow_id} task {d.label} job {d.job_id} event {d.number} "
            f"(attempts {d.attempts}) {error}"
        )


async def replay(
    store: Store, broker: Transport, selector: Selector, *, limit: int | None = None, dry_run: bool = False
) -> list[Outcome]:
    held: list[Incoming] = []  # go back to the DLQ at the end
    outcomes: list[Outcome] = []
    replayed = 0
    releaser = Releaser(store, broker, window=0)
    try:
        # each message once: the held ones stay unacked, so not delivered again, until the end
        while (message := await broker.get(broker.names.dlq)) is not None:
            try:
                if REFUSED_BY_HEADER in (message.headers or {}):
                    raise MessageError("a message a worker refused: never replayed")
                dead = decode(message.body, DeadLetter)
            except MessageError:
                held.append(message)  # a poison message, or one a worker refused: kept for a person to read
                continue
            if not selector.matches(dead) or (limit is not None and replayed >= limit):
                held.append(message)
                continue
            # the dead letter only selects: the payload and the attempts are Postgres's
            row = await store.dead_event(dead.job_id, dead.number)
            if row is None:
                outcomes.append(Outcome(dead, "skipped: no such event in the bookkeeping"))
                held.append(message)
            elif row["workflow_status"] == "cancelled":
                outcomes.append(Outcome(dead, "skipped: its workflow was cancelled"))
                held.append(message)
            elif row["status"] != "failed" and not (row["status"] == "queued" and row["attempt"] == dead.attempts + 1):
                # the event moved on (replayed already, or finished by a late attempt)
                outcomes.append(Outcome(dead, f"dropped: event is {row['status']} at attempt {row['attempt']}"))
                if not dry_run:
                    await message.ack()
                else:
                    held.append(message)
            elif dry_run:
                outcomes.append(Outcome(dead, "would replay"))
                held.append(message)
                replayed += 1
            else:
                # Postgres first: a range published for an event still 'failed' would be
                # refused. A replay killed after this finds the event queued at the next
                # attempt and publishes it again.
                attempt, issue, payload, workflow_id = row["attempt"], row["issue"], row["payload"], row["workflow_id"]
                if row["status"] == "failed":
                    fresh = await store.replay_event(workflow_id, dead.job_id, dead.number, attempt)
                    if fresh is None:  # replayed meanwhile by someone else
                        outcomes.append(Outcome(dead, "dropped: replayed meanwhile"))
                        await message.ack()
                        continue
                    attempt, issue, payload = fresh["attempt"], fresh["issue"], fresh["payload"]
                queue = broker.names.job(dead.job_id)
                await broker.declare_job_queue(queue)  # the job may have ended and lost its queue
                rng = EventRange(
                    workflow_id=workflow_id,
                    job_id=dead.job_id,
                    events=[EventSpec(number=dead.number, payload=payload, attempt=attempt, issue=issue)],
                )
                await broker.publish(queue, encode(rng))
                await releaser.announce_ids([dead.job_id])
                await message.ack()  # only now: the event is safe in its job's queue
                outcomes.append(Outcome(dead, "replayed"))
                replayed += 1
                log.info("event replayed", extra={"job": dead.job_id, "event": dead.number, "attempt": attempt})
    finally:
        await broker.give_back(broker.names.dlq, held)
    return outcomes


async def cancel(store: Store, broker: Transport, workflow_id: int) -> list[int] | None:
    """Cancel a running workflow: its remaining events become 'cancelled', its queues go,
    and workers stop its running payloads. None if the workflow is not running."""
    job_ids = await store.cancel_workflow(workflow_id)
    if job_ids is None:
        return None
    for job_id in job_ids:
        await broker.delete_queue(broker.names.job(job_id))
    if job_ids:
        await broker.broadcast(encode(CancelJobs(job_ids=job_ids)))
    log.info("workflow cancelled", extra={"workflow": workflow_id, "jobs": len(job_ids)})
    return job_ids
