"""Finisher: a job, task or workflow ends when every event under it is terminal.

Finalizing is idempotent (conditional updates in one transaction), so any number of
control planes may check the same job. A finished job's queue is deleted; a finished
task wakes the releaser for the tasks that depend on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from contextlib import suppress
from functools import partial

from dispatcher.store import Finished, Store
from transport.interface import Transport
from transport.outage import patiently

log = logging.getLogger(__name__)

RECHECK_SECONDS = 5.0  # first look at a queue whose delete went out unanswered
RECHECK_MAX_SECONDS = 60.0


class Finisher:
    """Deleting a finished job's queue is left to ``delete_queues`` when the control plane
    runs it (a quorum queue's delete waits for its members, seconds while one is down:
    it must not hold up the bookkeeping), and done at once otherwise.

    A delete sent without waiting is lost if the broker goes down before it runs it (seen
    when RabbitMQ stopped mid-run), so ``delete_queues`` looks again a while later and
    deletes again whatever is still there."""

    def __init__(
        self,
        store: Store,
        broker: Transport,
        on_task_end: Callable[[], None],
        *,
        recheck: float = RECHECK_SECONDS,
    ) -> None:
        self.store = store
        self.broker = broker
        self.on_task_end = on_task_end
        self.recheck = recheck
        self._doomed: dict[str, None] = {}  # queues to delete, oldest first
        self._sent: dict[str, tuple[float, float]] = {}  # unanswered deletes: (look at, delay)
        self._wake = asyncio.Event()
        self._deleting = False  # delete_queues runs

    async def check(self, job_ids: Iterable[int]) -> Finished:
        ids = list(job_ids)
        if not ids:
            return Finished([], [], [])
        done = await self.store.finish(ids)
        for job_id, status in done.jobs:
            # the job is finished in Postgres already, so a second check would not find
            # it to delete its queue: the deletion is waited out, never dropped
            self._doomed[self.broker.names.job(job_id)] = None
            log.debug("job ended", extra={"job": job_id, "status": status})
        if self._deleting:
            self._wake.set()
        else:
            await self.delete_doomed()
        for task_id, status in done.tasks:
            log.info("task ended", extra={"task_id": task_id, "status": status})
        for wf_id, status in done.workflows:
            log.info("workflow ended", extra={"workflow": wf_id, "status": status})
        if done.jobs:
            # a job left the release window (and a task may have ended): release more
            self.on_task_end()
        return done

    async def delete_doomed(self) -> None:
        while self._doomed:
            name = next(iter(self._doomed))
            wait = not self._deleting
            await patiently(partial(self.broker.delete_queue, name, wait=wait), what="deleting a job queue")
            self._doomed.pop(name, None)
            if not wait:
                # the first look after ``recheck`` s, each later one twice as late
                last = self._sent.pop(name, None)
                delay = self.recheck if last is None else min(last[1] * 2, RECHECK_MAX_SECONDS)
                self._sent[name] = (time.monotonic() + delay, delay)

    async def recheck_sent(self) -> None:
        """Delete again the queues that outlived a delete sent without waiting (a quorum
        queue's delete may still be under way while a member is down: sent again, later
        each time, it is harmless)."""
        now = time.monotonic()
        for name, (due, _delay) in list(self._sent.items()):
            if due > now:
                continue
            if await patiently(partial(self.broker.queue_state, name), what="looking at a deleted job queue") is None:
                del self._sent[name]
            else:
                log.info("job queue outlived its delete: deleting it again", extra={"queue": name})
                self._doomed[name] = None
        await self.delete_doomed()

    async def delete_queues(self) -> None:
        """Delete finished jobs' queues in the background, for as long as it runs."""
        self._deleting = True
        try:
            while True:
                timeout = None
                if self._sent:
                    timeout = max(0.0, min(due for due, _ in self._sent.values()) - time.monotonic())
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
                self._wake.clear()
                await self.delete_doomed()
                await self.recheck_sent()
        finally:
            self._deleting = False
