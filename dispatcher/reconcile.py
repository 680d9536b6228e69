"""Reconciliation: Postgres is the truth, RabbitMQ a transport rebuilt from it.

The watchdog (the leader's) runs ``round`` every few seconds, and ``dispatcher doctor``
runs ``look`` (and, with ``--repair``, ``repair``). What they find:

- an active job whose queue is missing, or empty with nobody consuming it and no live
  worker serving it, while Postgres says events of it wait there: the queue lost its
  ranges (purged, or lost with a node's disk). Its waiting events are published again
  as new copies (a copy still held somewhere is stale, and the bookkeeping is
  idempotent). An empty queue must be seen so twice in a row: a worker may be taking
  the job up, or reporting its last events, at the first look.
- an active job none of whose events is left to run: finished, whatever its state
  (``releasing`` too: its control plane died between publishing and marking it queued).
- a finished job's queue still there (its delete was lost with a control plane): deleted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from dispatcher.finisher import Finisher
from dispatcher.releaser import Releaser
from dispatcher.store import Store
from transport.interface import Transport

log = logging.getLogger(__name__)

# a control plane that stalled while publishing a job (SIGSTOP, a frozen VM) and was taken
# over may, if it wakes up, still send the batch it had started until RabbitMQ drops its
# connection (two missed heartbeats): a queue found hollow is mended only once the job's
# claim is older than that, so that such a batch is not published twice
CLAIM_SETTLE_SECONDS = 30.0


@dataclass(frozen=True)
class Disagreement:
    """Where RabbitMQ does not hold what Postgres says it should."""

    job_id: int
    kind: str  # queue missing | queue emptied | job stuck | queue left behind
    detail: str

    def describe(self) -> str:
        return f"job {self.job_id}: {self.kind}: {self.detail}"


class Reconciler:
    def __init__(self, store: Store, broker: Transport, releaser: Releaser, finisher: Finisher) -> None:
        self.store = store
        self.broker = broker
        self.releaser = releaser
        self.finisher = finisher
        self._emptied: set[int] = set()  # jobs seen with an empty, unconsumed queue last round

    async def look(self, *, deep: bool = False, settle: float = 0.0) -> list[Disagreement]:
        """Every disagreement between Postgres and RabbitMQ found now (changes nothing).
        ``deep``: also look for queues of recently ended jobs left behind (a doctor's
        question; the watchdog leaves it, at a passive declare per job). ``settle``:
        leave jobs claimed less than this many seconds ago (see CLAIM_SETTLE_SECONDS)."""
        names = self.broker.names
        found = [
            Disagreement(job, "job stuck", "every event has ended but the job is still active")
            for job in await self.store.stuck_jobs()
        ]
        hollow: dict[int, tuple[int, int] | None] = {}  # a queue missing, or empty with no consumer
        for job in await self.store.unattended_jobs():
            state = await self.broker.queue_state(names.job(job))
            if state is None or state == (0, 0):
                hollow[job] = state
        for job, n in sorted((await self.store.waiting_in_queue(list(hollow), settle)).items()):
            if hollow[job] is None:
                found.append(Disagreement(job, "queue missing", f"{n} events wait in Postgres"))
            else:
                found.append(Disagreement(job, "queue emptied", f"no range and no consumer; {n} events wait"))
        if deep:
            for job in await self.store.recently_ended_jobs():
                if await self.broker.queue_state(names.job(job)) is not None:
                    found.append(Disagreement(job, "queue left behind", "the job has ended"))
        return found

    async def repair(self, found: list[Disagreement]) -> None:
        """Mend what ``look`` found: publish lost ranges again, finish stuck jobs, delete
        queues left behind."""
        lost = sorted({d.job_id for d in found if d.kind in ("queue missing", "queue emptied")})
        if lost:
            log.warning("republishing jobs whose queue lost its ranges", extra={"jobs": lost[:20], "count": len(lost)})
            await self.releaser.republish(lost)
        stuck = [d.job_id for d in found if d.kind == "job stuck"]
        if stuck:
            log.warning("finishing jobs whose events have all ended", extra={"jobs": stuck[:20]})
            await self.finisher.check(stuck)
        for d in found:
            if d.kind == "queue left behind":
                await self.broker.delete_queue(self.broker.names.job(d.job_id))

    async def round(self) -> list[Disagreement]:
        """One watchdog round: ``look``, then repair what is certain (an emptied queue
        only once it was seen emptied in the round before). Returns what it repaired."""
        found = await self.look(settle=CLAIM_SETTLE_SECONDS)
        emptied = {d.job_id for d in found if d.kind == "queue emptied"}
        seen, self._emptied = self._emptied, emptied
        sure = [d for d in found if d.kind != "queue emptied" or d.job_id in seen]
        if sure:
            await self.repair(sure)
        return sure
